"""The model is never left modified: after any call, also one that raised mid-way.

After each analysis (and after a failure raised inside the model's forward,
inside a metric, or inside a step of the runner), the Hugging Face module has
no hook on any module, the same train/eval flags, parameters, buffers,
requires_grad flags, no gradients, the same config, and gives the same logits
as before the call.
"""

from __future__ import annotations

import importlib

import pytest
import tiny
import torch

import hydra_probe as hp
from hydra_probe.checks import read_only

HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
              "_load_state_dict_pre_hooks")


def hooks_of(model: torch.nn.Module) -> list[str]:
    return [f"{n or '<root>'}.{a}" for n, mod in model.named_modules() for a in HOOK_ATTRS if getattr(mod, a, None)]


def global_hooks() -> int:
    mm = torch.nn.modules.module
    return sum(len(getattr(mm, n, {})) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                  "_global_backward_hooks", "_global_backward_pre_hooks"))


class State:
    """Everything a call could leave changed on ``hf``."""

    def __init__(self, hf: torch.nn.Module, ids: torch.Tensor) -> None:
        self.flags = {n: mod.training for n, mod in hf.named_modules()}
        self.params = {n: p.detach().clone() for n, p in hf.named_parameters()}
        self.req = {n: p.requires_grad for n, p in hf.named_parameters()}
        self.grads = {n: p.grad is None for n, p in hf.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in hf.named_buffers()}
        self.config = hf.config.to_dict()
        self.forward = type(hf).forward
        self.modules = [type(mod) for mod in hf.modules()]
        self.hooks = hooks_of(hf)
        self.grad_enabled = torch.is_grad_enabled()
        self.globals = global_hooks()
        flags = self.flags
        hf.eval()
        with torch.no_grad():
            self.logits = hf(ids).logits.clone()
        for n, mod in hf.named_modules():
            mod.training = flags[n]

    def assert_same(self, hf: torch.nn.Module, ids: torch.Tensor) -> None:
        after = State(hf, ids)
        assert after.hooks == self.hooks == [], after.hooks
        assert after.globals == self.globals
        assert after.flags == self.flags
        assert after.req == self.req
        assert after.grads == self.grads, "gradients were left on parameters"
        assert after.grad_enabled == self.grad_enabled
        assert after.config == self.config
        assert after.forward is self.forward and after.modules == self.modules
        for n, p in self.params.items():
            assert torch.equal(p, after.params[n]), n
        for n, b in self.buffers.items():
            assert torch.equal(b, after.buffers[n]), n
        assert torch.equal(self.logits, after.logits)


def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def calls():
    """name -> fn(model, task); path/attribution/iterated only once they exist in the tree."""
    out = {
        "direct_effects": lambda m, t: hp.direct_effects(m, t, "all", scale="recomputed"),
        "ablate": lambda m, t: hp.ablate(m, t, ["L0H1", "MLP0", "L0H0+L1H1"], value="resample", seed=1),
        "paired_ablation": lambda m, t: hp.paired_ablation(m, t, [("L0H0", "L1H1")], value="zero"),
        "self_repair": lambda m, t: hp.self_repair(m, t, "all", value="mean", scale="frozen"),
        "activation_patch": lambda m, t: hp.activation_patch(m, t, ["L0H1", "MLP1", "RESID1"], direction="noise"),
    }
    pp = _optional("hydra_probe.effects.path", "path_patch")
    if pp is not None:
        out["path_patch"] = lambda m, t: pp(m, t, ["L0H0", "MLP0"], [["L1H1"], ["logits"]], direction="noise")
    ap = _optional("hydra_probe.effects.attribution", "attribution_patch")
    if ap is not None:
        out["attribution_patch"] = lambda m, t: ap(m, t, ["L0H0", "MLP1", "RESID1"])
    it = _optional("hydra_probe.effects.iterated", "iterated_ablation")
    if it is not None:
        out["iterated_ablation"] = lambda m, t: it(m, t, "L0H0", ["L1H0", "MLP1"])
    return out


CALLS = calls()


_MODELS: dict[str, tuple] = {}


def setup(family: str, train: bool = True):
    """A shared tiny model of ``family`` (every test checks it is left as it was) in a mixed train/eval state."""
    if family not in _MODELS:
        m = tiny.model(family, layers=2, heads=2, d=16)
        _MODELS[family] = (m, tiny.ioi(m, 4))
    m, task = _MODELS[family]
    m.hf_model.eval()
    if train:  # a mixed train/eval state must come back exactly as it was
        m.hf_model.train()
        m.adapter.blocks[0].eval()
    ids = task.clean_ids[0][None]
    return m, task, ids


CASES = [(n, "gpt2") for n in CALLS] + [(n, "llama") for n in CALLS if n in
                                         ("self_repair", "activation_patch", "path_patch", "attribution_patch")]


@pytest.mark.parametrize("name,family", CASES)
def test_model_unchanged_after_call(name, family):
    m, task, ids = setup(family)
    before = State(m.hf_model, ids)
    CALLS[name](m, task)
    before.assert_same(m.hf_model, ids)


class Boom(Exception):
    pass


FAILURES = [(n, 2 if n == "direct_effects" else 3) for n in CALLS] + [("ablate", 1)]


@pytest.mark.parametrize("name,when", FAILURES)
def test_model_unchanged_after_a_failure_inside_the_forward(name, when):
    """Raise from inside the model's last MLP on its ``when``-th call (clean prefix, or an intervened run)."""
    m, task, ids = setup("gpt2")
    before = State(m.hf_model, ids)
    seen = {"n": 0, "package_hooks": 0}
    target = m.adapter.blocks[-1].mlp

    def explode(mod, args):
        seen["n"] += 1
        if seen["n"] == when:
            seen["package_hooks"] = len(hooks_of(m.hf_model)) - 1  # ours excluded
            raise Boom("interrupted")

    h = target.register_forward_pre_hook(read_only(explode))  # a failure injected, not an edit
    try:
        with pytest.raises(Boom):
            CALLS[name](m, task)
    finally:
        h.remove()
    before.assert_same(m.hf_model, ids)
    if when > 1:
        # the failure hit while the package's own hooks were registered
        assert seen["package_hooks"] > 0


def test_model_unchanged_after_a_failing_metric_and_a_failing_step(monkeypatch):
    m, task, ids = setup("llama")
    before = State(m.hf_model, ids)
    n = {"k": 0}

    def flaky(logits, answer, alternative):
        n["k"] += 1
        if n["k"] == 3:
            raise Boom("metric failed")
        return logits.gather(1, answer[:, None]).squeeze(1)

    with pytest.raises(Boom):
        hp.ablate(m, task, "heads", metric=flaky)
    before.assert_same(m.hf_model, ids)

    from hydra_probe.runner import runner as R

    real = R.Runner._finish
    k = {"n": 0}

    def finish(self, *a, **kw):
        k["n"] += 1
        if k["n"] == 2:
            raise Boom("step failed")
        return real(self, *a, **kw)

    monkeypatch.setattr(R.Runner, "_finish", finish)
    with pytest.raises(Boom):
        hp.self_repair(m, task, "all")
    before.assert_same(m.hf_model, ids)


def test_model_unchanged_after_a_refused_call():
    m, task, ids = setup("gpt2")
    before = State(m.hf_model, ids)
    with pytest.raises(hp.ComponentError):
        hp.self_repair(m, task, ["L0H0", "L9H9"])
    with pytest.raises(hp.MetricError):
        hp.activation_patch(m, hp.tasks.from_pairs(m, [dict(p, corrupted=p["clean"]) for p in task.pairs]))
    before.assert_same(m.hf_model, ids)


def test_model_unchanged_with_the_nnsight_backend():
    hf = tiny.hf_model("gpt2", layers=2, heads=2, d=16)
    m = hp.load_model(hf, tokenizer=tiny.tokenizer(), backend="nnsight")
    task = tiny.ioi(m, 4)
    ids = task.clean_ids[0][None]
    before = State(hf, ids)
    local = hp.ablate(hp.load_model(hf, tokenizer=tiny.tokenizer()), task, ["L0H1", "MLP1"])
    nn = hp.ablate(m, task, ["L0H1", "MLP1"])
    assert abs(local.to_frame().total_effect - nn.to_frame().total_effect).max() < 1e-5
    before.assert_same(hf, ids)


def test_interrupted_report_leaves_no_partial_report_and_the_model_unchanged(tmp_path, monkeypatch):
    """A report interrupted inside a step (mid-way through its forwards) or while it is written leaves no
    report folder (nor a temporary one), an existing report untouched, and the model as it was."""
    triangulate = _optional("hydra_probe.report", "triangulate")
    if triangulate is None:
        pytest.skip("hydra_probe.report.triangulate is not in the tree yet")
    import hydra_probe.report.render as render

    m, task, ids = setup("gpt2")
    before = State(m.hf_model, ids)
    target = m.adapter.blocks[-1].mlp
    count = {"n": 0, "stop": None}

    def counter(mod, args):
        count["n"] += 1
        if count["n"] == count["stop"]:
            raise Boom("interrupted mid-report")

    h = target.register_forward_pre_hook(read_only(counter))
    try:
        rep = triangulate(m, task, top=1, iterate=1, progress=False)  # the full run: count its forwards
        total, count["n"], count["stop"] = count["n"], 0, count["n"] // 2
        with pytest.raises(Boom):
            triangulate(m, task, top=1, iterate=1, progress=False)
    finally:
        h.remove()
    assert total > 10 and count["n"] == total // 2
    before.assert_same(m.hf_model, ids)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "to_html", interrupted)  # after tables, results.json and report.md are written
    with pytest.raises(KeyboardInterrupt):
        rep.save(tmp_path / "report", figures=False)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.md").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        rep.save(old, overwrite=True, figures=False)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and [p.name for p in old.iterdir()] == ["report.md"]
    monkeypatch.undo()
    out = rep.save(tmp_path / "report", figures=False)
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    before.assert_same(m.hf_model, ids)


def test_model_unchanged_after_the_issue_18_refusals():
    """Each refusal of the argument checks (hydra_probe/checks.py) leaves the model exactly as it was,
    including a user's own hook that the check found (it stays; nothing else is added)."""
    m, task, ids = setup("gpt2")
    before = State(m.hf_model, ids)
    calls = [
        (hp.ComponentError, lambda: hp.ablate(m, task, ["L0H0", "L0H0"])),
        (hp.ComponentError, lambda: hp.paired_ablation(m, task, [("ATTN1", "L1H0")])),
        (hp.ComponentError, lambda: hp.path_patch(m, task, "ATTN0+L0H1", "logits")),
        (hp.ComponentError, lambda: hp.iterated_ablation(m, task, "ATTN1", ["L1H1"])),
        (hp.TaskError, lambda: hp.self_repair(m, task.subset([0]), "heads")),
        (hp.OptionError, lambda: hp.ablate(m, task, "heads", positions=[])),
        (hp.OptionError, lambda: hp.ablate(m, task, "heads", value="resample", seed=2**40)),
        (hp.MetricError, lambda: hp.direct_effects(m, task, metric=hp.Metric("sq", True, lambda lg, a, b: lg[:, 0] ** 2))),
    ]
    for cls, call in calls:
        with pytest.raises(cls):
            call()
    before.assert_same(m.hf_model, ids)
    h = m.adapter.final_norm.register_forward_hook(lambda mod, args, out: out * 2)
    try:
        with pytest.raises(hp.ForeignHookError):
            hp.self_repair(m, task, "heads")
        assert len(hooks_of(m.hf_model)) == 1
    finally:
        h.remove()
    before.assert_same(m.hf_model, ids)
