import pytest
import tiny

import hydra_probe as hp
from hydra_probe.components import Component, is_downstream, parse, select_groups


def test_parse_and_names_roundtrip():
    for name in ("L0H0", "L2H3", "ATTN1", "MLP2", "RESID3"):
        assert parse(name, 3, 4).name == name
    c = parse("L1H2", 3, 4)
    assert c == Component("head", 1, 2) and hash(c) == hash(Component("head", 1, 2))


@pytest.mark.parametrize("bad,words", [("L3H0", "layer 3 is out of range"), ("L0H4", "head 4 is out of range"),
                                        ("MLP9", "out of range"), ("head5", "unknown component"),
                                        ("l0h0", "unknown component")])
def test_bad_names_raise_with_valid_range(bad, words):
    with pytest.raises(hp.ComponentError, match=words):
        parse(bad, 3, 4)


def test_component_from_another_model_is_refused():
    big = tiny.model("gpt2", layers=3, heads=4)
    small = tiny.model("gpt2", layers=2, heads=2)
    c = big.components("L0H1")[0]
    with pytest.raises(hp.ComponentError, match="made for a model with 3 layers x 4 heads"):
        small.components([c])


def test_downstream_respects_parallel_residual():
    h, a, m, m1 = Component("head", 1, 0), Component("attn", 1), Component("mlp", 1), Component("mlp", 0)
    assert is_downstream(m, h, parallel=False) and not is_downstream(m, h, parallel=True)
    assert not is_downstream(Component("head", 1, 1), h, parallel=False)
    assert is_downstream(h, m1, parallel=True) is not False  # later layer reads MLP0 in both
    assert is_downstream(Component("head", 2, 0), m, parallel=True)
    assert is_downstream(a, m1, parallel=True) is not False


def test_selectors_and_groups():
    m = tiny.model("neox")
    assert [c.name for c in m.components("layers")] == ["ATTN0", "ATTN1", "ATTN2"]
    gs = select_groups(m, ["L0H0+L1H1", ["MLP0", "MLP1"], "L2H3"])
    assert [g.name for g in gs] == ["L0H0+L1H1", "MLP0+MLP1", "L2H3"]
    with pytest.raises(hp.ComponentError):
        m.components([])


def test_stage_is_an_int_in_execution_order():
    order = ["RESID0", "L0H1", "ATTN0", "MLP0", "L1H0", "MLP1", "RESID2"]
    stages = [parse(n, 2, 2).stage for n in order]
    assert all(type(s) is int for s in stages)
    assert stages == [0, 0, 0, 1, 2, 3, 4]


def test_checks_refuse_duplicates_and_overlaps_inside_groups():
    from hydra_probe.checks import check_components, check_group

    m = tiny.model("gpt2", layers=2, heads=2)
    check_components(m, ["ATTN1", "L1H0"], grouped=True)  # two separate ablations: allowed
    with pytest.raises(hp.ComponentError, match="ATTN1 contains L1H0"):
        check_components(m, ["ATTN1+L1H0"], grouped=True)
    with pytest.raises(hp.ComponentError, match="L0H1 is named more than once"):
        check_components(m, ["heads", "L0H1"], grouped=False)
    with pytest.raises(hp.ComponentError, match="MLP0 appears twice"):
        check_group([parse("MLP0", 2, 2), parse("MLP0", 2, 2)], "components")
