"""Text mode: self-repair at every position equals a prefix-by-prefix computation with the existing API."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.effects.text import TextSelfRepair, read_texts, select_top, text_self_repair
from hydra_probe.tasks.task import Task

TEXTS = ["Then , Mary and John went to the store", "Tom gave a ring to Amy at the park", "w1 w2 w3 w4 w5",
         "Kate found a book at the school"]
COMPS = ["L0H1", "L1H2", "MLP0", "L2H0+MLP1", "ATTN1"]
COLS = {"direct_effect": "clean_de", "de_lost": "de_lost", "total_effect": "total_effect",
        "self_repair": "self_repair", "norm_term": "norm_term", "postnorm_term": "postnorm_term",
        "softcap_term": "softcap_term"}
# the issue-12 families (post-attention norms, logit soft-cap, q/k norms, fused projections): one setting each
NEW = [(f, v, s) for f, v, s in zip(tiny.NEW_FAMILIES, ["resample", "mean"] * 3, ["recomputed", "frozen"] * 3)]


def _task(prompts: list[torch.Tensor], answers: list[int]) -> Task:
    """A task straight from token ids (no tokenizer involved): read at the last position of each prompt."""
    empty = {"clean": "", "corrupted": "", "answer": "", "alternative": ""}
    return Task([dict(empty) for _ in prompts], "prefix", "none", 0, list(prompts), list(prompts),
                torch.tensor(answers), torch.tensor(answers))


def _reference(m, texts, comps, value, scale, runs):
    """Prefix by prefix: every prompt is a prefix t_0..t_p of a text, read at its end (metric = logit of t_{p+1}).

    zero / mean: one self_repair task per position p (the texts reaching p+1; mean over the texts reaching
    each position). resample: one task per text, its prompts every prefix, the value a mean over two copies
    of the donor text (= the donor's activation at each position).
    """
    ids = [torch.tensor(m.tokenizer(t)["input_ids"]) for t in texts]
    rows = []
    items = []  # (text index and position per prompt, value)
    if value == "resample":
        for ti, x in enumerate(ids):
            d = int(runs.loc[runs.text == ti, "donor_text"].iloc[0])
            ps = [p for p in range(len(x) - 1) if len(ids[d]) > p]
            items.append(([(ti, p) for p in ps], _task([ids[d][: ps[-1] + 1]] * 2, [0, 0])))
    else:
        second = sorted(len(x) for x in ids)[-2]  # mean: positions one text alone reaches are not read
        for p in range(max(len(x) for x in ids) - 1):
            tis = [ti for ti, x in enumerate(ids) if len(x) > p + 1 and (value != "mean" or p < second)]
            if tis:
                items.append(([(ti, p) for ti in tis], _task(ids, [0] * len(ids)) if value == "mean" else value))
    for where, val in items:
        task = _task([ids[ti][: p + 1] for ti, p in where], [int(ids[ti][p + 1]) for ti, p in where])
        sr = hp.self_repair(m, task, comps, value=val, scale=scale, metric="logit").to_frame()
        sr["text"] = [where[i][0] for i in sr["prompt"]]
        sr["position"] = [where[i][1] for i in sr["prompt"]]
        rows.append(sr)
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("family,value,scale",
                         [(f, v, s) for f in tiny.FAMILIES
                          for v, s in [("zero", "frozen"), ("mean", "recomputed"), ("resample", "frozen")]] + NEW)
def test_text_mode_equals_prefix_by_prefix(family, value, scale):
    m = tiny.model(family)
    res = text_self_repair(m, TEXTS, components=COMPS, value=value, scale=scale)
    f = res.to_frame()
    ref = _reference(m, TEXTS, COMPS, value, scale, res.runs())
    assert len(f) == len(ref) > 0
    ref = ref.rename(columns={c: f"ref_{c}" for c in ref.columns if c not in ("component", "text", "position")})
    both = f.merge(ref, on=["component", "text", "position"], validate="one_to_one")
    assert len(both) == len(f)
    for a, b in COLS.items():
        np.testing.assert_allclose(both[a], both[f"ref_{b}"], atol=2e-5, rtol=1e-4, err_msg=f"{family} {value} {a}")
    # the metric is the logit of the actual next token, as the model computes it
    np.testing.assert_allclose(both["clean_logit"], both["ref_clean_metric"], atol=2e-5, rtol=1e-4)
    ids = {ti: m.tokenizer(t)["input_ids"] for ti, t in enumerate(TEXTS)}
    assert [ids[t][p + 1] for t, p in zip(f["text"], f["position"])] == list(f["token_id"])


def test_total_effect_matches_ablate_and_every_position_is_read():
    m = tiny.model("gpt2")
    res = text_self_repair(m, TEXTS[:2], components=["L1H3"], value="zero")
    f = res.to_frame()
    ids = torch.tensor(m.tokenizer(TEXTS[0])["input_ids"])
    assert sorted(f.loc[f.text == 0, "position"]) == list(range(len(ids) - 1))
    assert list(f.loc[f.text == 0, "token_id"]) == ids[1:].tolist()
    for p in (0, 3, len(ids) - 2):
        a = hp.ablate(m, _task([ids[: p + 1]], [int(ids[p + 1])]), ["L1H3"], value="zero", metric="logit").to_frame()
        te = f.loc[(f.text == 0) & (f.position == p), "total_effect"].item()
        assert te == pytest.approx(a["total_effect"].item(), abs=1e-5)


def test_bos_tokenizer_reads_the_first_token_after_bos():
    m = tiny.model("llama")  # its tokenizer adds a BOS
    f = text_self_repair(m, TEXTS, components=["L0H0"], value="zero").to_frame()
    ids = m.tokenizer(TEXTS[1])["input_ids"]
    assert ids[0] == m.tokenizer.bos_token_id
    g = f[f.text == 1].sort_values("position")
    assert list(g["position"]) == list(range(len(ids) - 1))
    assert g["token"].iloc[0].strip() == "Tom"


def test_resample_donors_are_other_texts_at_least_as_long_and_seeded():
    m = tiny.model("gpt2")
    texts = ["w1 w2", "w3 w4 w5 w6", "w7 w8 w9", "w10 w11 w12 w13 w14 w15"]
    r1 = text_self_repair(m, texts, components=["L0H0"], value="resample", seed=3)
    runs = r1.runs()
    lens = dict(zip(runs.text, runs.n_tokens))
    full = [len(m.tokenizer(t)["input_ids"]) for t in texts]
    for t, d in zip(runs.text, runs.donor_text):
        assert d != t
        if full[t] < max(full):
            assert full[d] >= full[t] and lens[t] == full[t]
    longest = int(np.argmax(full))
    second = sorted(full)[-2]
    assert lens[longest] == second  # cut where its donor ends
    assert r1.provenance["positions_dropped"] == (max(full) - 1) - second  # read 0..second-1 of 0..max-2
    r2 = text_self_repair(m, texts, components=["L0H0"], value="resample", seed=3)
    pd.testing.assert_frame_equal(r1.to_frame(), r2.to_frame())
    # mean: the positions only the longest text reaches are not read (a one-text mean is the text itself)
    rm = text_self_repair(m, texts, components=["L0H0"], value="mean")
    assert rm.provenance["positions_dropped"] == (max(full) - 1) - second
    assert rm.to_frame().query(f"text == {longest}")["position"].max() == second - 1
    with pytest.raises(hp.TaskError, match="at least two texts"):
        text_self_repair(m, texts[:1], components=["L0H0"], value="mean")


def test_long_text_refused_or_windowed():
    m = tiny.model("gpt2")  # context 64
    words = " ".join(f"w{i % 60}" for i in range(150))
    with pytest.raises(hp.TaskError, match="beyond the model's context of 64.*window"):
        text_self_repair(m, [words, "w1 w2 w3"], components=["L0H0"], value="zero")
    res = text_self_repair(m, [words, "w1 w2 w3"], components=["L0H0"], value="zero", window=40)
    f = res.to_frame()
    g = f[f.text == 0]
    assert sorted(g["position"]) == list(range(149))  # every position once, across window boundaries too
    ids = torch.tensor(m.tokenizer(words)["input_ids"])
    assert list(g.sort_values("position")["token_id"]) == ids[1:].tolist()
    # a row in the second window equals the prefix computation from that window's start
    for q in (40, 79, 120):
        start = (q // 40) * 40
        sub = ids[start: q + 1]
        ref = hp.self_repair(m, _task([sub], [int(ids[q + 1])]), ["L0H0"], value="zero", metric="logit").to_frame()
        row = g[g.position == q]
        assert row["total_effect"].item() == pytest.approx(ref["total_effect"].item(), abs=1e-5)
        assert row["direct_effect"].item() == pytest.approx(ref["clean_de"].item(), abs=1e-5)
    with pytest.raises(hp.OptionError, match="exceeds the model's context"):
        text_self_repair(m, [words], components=["L0H0"], value="zero", window=100)


def test_windows_with_bos_skip_their_added_bos():
    m = tiny.model("llama")
    words = " ".join(f"w{i % 60}" for i in range(30))
    f = text_self_repair(m, [words, "w1 w2"], components=["L0H0"], value="zero", window=8).to_frame()
    g = f[f.text == 0]
    assert sorted(g["position"]) == list(range(30))  # 31 tokens with BOS: positions 0..29 read once each


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_nnsight_backend_gives_the_same_rows(family):
    hf = tiny.hf_model(family)
    tok = tiny.tokenizer(bos=family == "llama")
    a = text_self_repair(hp.load_model(hf, tokenizer=tok), TEXTS, ["L0H1", "MLP1"], value="resample").to_frame()
    b = text_self_repair(hp.load_model(hf, tokenizer=tok, backend="nnsight"), TEXTS, ["L0H1", "MLP1"],
                         value="resample").to_frame()
    pd.testing.assert_frame_equal(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- the summary
def _hand(de, dl, te, nt, texts, comp="L0H0"):
    n = len(de)
    de, dl, te, nt = map(np.asarray, (de, dl, te, nt))
    return pd.DataFrame({"component": comp, "text": texts, "position": range(n), "token": "x", "token_id": 0,
                         "direct_effect": de, "de_lost": dl, "total_effect": te, "self_repair": dl - te,
                         "norm_term": nt, "clean_logit": 0.0, "ablated_logit": 0.0})


def test_select_top_on_hand_made_numbers():
    f = _hand([5, 1, 3, 3, 2, -4, 0, 7, 3, 1], [0] * 10, [0] * 10, [0] * 10, [0] * 10)
    assert list(select_top(f, 0.2)["direct_effect"]) == [5, 7]           # ceil(2.0) = 2, in row order
    assert list(select_top(f, 0.3)["position"]) == [0, 2, 7]             # ties at 3: the first one by row order
    assert list(select_top(f, 0.01)["direct_effect"]) == [7]             # at least one
    assert len(select_top(f, 1)) == 10
    assert list(select_top(f, 0.25)["direct_effect"]) == [5, 3, 7]       # ceil(2.5) = 3
    for bad in (0, -0.1, 1.5, True, "0.1", float("nan")):
        with pytest.raises(hp.OptionError, match=r"top_fraction must be a number in \(0, 1\]"):
            select_top(f, bad)


def test_summary_on_hand_made_numbers():
    # 10 positions over 5 texts; top 50 % by DE are rows 5..9 (DE 6..10)
    de = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    dl = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    te = [1, 2, 3, 4, 5, 3, 7, 2, 9, 5]          # SR on the top rows: 3, 0, 6, 0, 5
    nt = [0, 0, 0, 0, 0, 1, 0, 3, 0, 1]
    f = pd.concat([_hand(de, dl, te, nt, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),
                   _hand(de[::-1], dl, te, nt, [0] * 10, comp="MLP1")], ignore_index=True)
    res = TextSelfRepair(f, {"top_fraction": 0.5, "seed": 0})
    s = res.summary().set_index("component")
    a = s.loc["L0H0"]
    assert a["n_positions"] == 10 and a["n_top"] == 5 and a["n_texts"] == 3 and a["de_threshold"] == 6
    assert a["direct_effect"] == pytest.approx(8.0)
    assert a["self_repair"] == pytest.approx(14 / 5)
    assert a["total_effect"] == pytest.approx(26 / 5)
    assert a["sr_over_de_lost"] == pytest.approx(np.median([3 / 6, 0, 6 / 8, 0, 5 / 10]))
    assert a["norm_share"] == pytest.approx(5 / 14)
    slope = np.polyfit([6, 7, 8, 9, 10], [3, 7, 2, 9, 5], 1)[0]
    assert a["hydra_slope"] == pytest.approx(slope)
    assert a["self_repair_lo"] <= a["self_repair"] <= a["self_repair_hi"]
    b = s.loc["MLP1"]                               # reversed DE: the top half is rows 0..4, one text only
    assert b["de_threshold"] == 6 and b["n_texts"] == 1 and np.isnan(b["self_repair_lo"])
    assert b["self_repair"] == pytest.approx(0.0)
    assert res.summary(top_fraction=1.0).set_index("component").loc["L0H0", "n_top"] == 10
    assert np.isfinite(res.hydra_slope()["slope"]) or res.hydra_slope()["n"] == 2


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_top_contributions_close_on_the_top_positions(family):
    m = tiny.model(family)
    res = text_self_repair(m, TEXTS, components=["L0H1", "MLP0", "L1H0+L1H2"], value="resample", top_fraction=0.3)
    tc = res.top_contributions()
    s = res.summary().set_index("component")
    for c, g in tc.groupby("component"):
        sr_mean = s.loc[c, "self_repair"]
        assert g["delta_de"].sum() == pytest.approx(sr_mean, abs=1e-6)  # the rows close on the mean SR of the top
        assert abs(g["share_of_self_repair"].sum() - 1) * abs(sr_mean) < 1e-6
        assert "NORM" in set(g["downstream"]) and (g["n_top"] == s.loc[c, "n_top"]).all()
    # the downstream rows are those of the prompt-task decomposition
    sr = hp.self_repair(m, _task([torch.tensor(m.tokenizer(TEXTS[0])["input_ids"])], [0]), ["L0H1"], value="zero",
                        metric="logit")
    assert set(tc.loc[tc.component == "L0H1", "downstream"]) == set(sr.contributions()["downstream"])


def test_summary_runs_on_a_real_result_and_round_trips(tmp_path):
    m = tiny.model("neox")
    res = text_self_repair(m, TEXTS, components="heads", value="mean", top_fraction=0.1)
    s = res.summary()
    assert len(s) == m.n_layers * m.n_heads
    assert (s["n_top"] == np.ceil(0.1 * s["n_positions"] - 1e-9)).all()
    back = hp.load_result(res.save(tmp_path / "t.json"))
    assert isinstance(back, TextSelfRepair)
    pd.testing.assert_frame_equal(back.to_frame(), res.to_frame(), check_dtype=False)
    assert back.runs().equals(res.runs())
    pd.testing.assert_frame_equal(back.top_contributions(), res.top_contributions(), check_dtype=False)
    for k in ("model", "metric", "value", "scale", "seed", "top_fraction", "n"):
        assert k in res.provenance
    assert res.provenance["metric"] == "next_token_logit"


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_are_refused_before_any_forward():
    m = tiny.model("gpt2")
    with pytest.raises(hp.TaskError, match="text list is empty"):
        text_self_repair(m, [], value="zero")
    with pytest.raises(hp.TaskError, match="single string"):
        text_self_repair(m, "Mary went to the store", value="zero")
    with pytest.raises(hp.TaskError, match="text 1 .* 1 token"):
        text_self_repair(m, ["Mary went", "Mary"], value="zero")
    with pytest.raises(hp.TaskError, match="text 0 .* 0 token"):
        text_self_repair(m, ["", "Mary went"], value="zero")
    with pytest.raises(hp.TaskError, match="at least two texts"):
        text_self_repair(m, ["Mary went to the store"], value="resample")
    for bad in (0, 1.01, -1, None):
        with pytest.raises(hp.OptionError, match="top_fraction"):
            text_self_repair(m, TEXTS, value="zero", top_fraction=bad)
    with pytest.raises(hp.OptionError, match="ablation value"):
        text_self_repair(m, TEXTS, value="clean")
    with pytest.raises(hp.OptionError, match="scale"):
        text_self_repair(m, TEXTS, value="zero", scale="own")
    with pytest.raises(hp.ComponentError):
        text_self_repair(m, TEXTS, components="L9H0", value="zero")
    with pytest.raises(hp.OptionError, match="window"):
        text_self_repair(m, TEXTS, value="zero", window=1)


def test_read_texts(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"Mary went to the store\n\nJohn went home\r\n")
    assert read_texts(p) == ["Mary went to the store", "John went home"]
    j = tmp_path / "t.jsonl"
    j.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n")
    assert read_texts(j) == TEXTS
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nalso fine\nbad \xff\xfe here\n")
    with pytest.raises(hp.TaskError, match=r"bad.txt:3: not valid UTF-8 \(byte 0xff at column 5\)"):
        read_texts(bad)
    badj = tmp_path / "bad.jsonl"
    badj.write_text('{"text": "a b"}\n{"txt": "c"}\n')
    with pytest.raises(hp.TaskError, match=r"bad.jsonl:2: .*'text' field"):
        read_texts(badj)
    badj.write_text('{"text": "a b"}\n{"text": \n')
    with pytest.raises(hp.TaskError, match=r"bad.jsonl:2: malformed JSON"):
        read_texts(badj)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(hp.TaskError, match="holds no text"):
        read_texts(empty)
    with pytest.raises(hp.TaskError, match="does not exist"):
        read_texts(tmp_path / "missing.txt")
