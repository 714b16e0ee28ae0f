"""The catalogue of bad inputs (analyses/error_catalogue.py, docs/errors.md), tested entry by entry.

Each entry must raise exactly its class from the package's exception family,
with a one-line message holding its key words, before any forward pass (where
the entry says so), leaving no file behind and no hook on the model; and the
message must be the one docs/errors.md shows. Then: out-of-memory retries,
safe loading, JSON results, atomic folders.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import tiny
import torch

import hydra_probe as hp

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("error_catalogue", ROOT / "analyses" / "error_catalogue.py")
CAT = importlib.util.module_from_spec(_spec)
sys.modules["error_catalogue"] = CAT
_spec.loader.exec_module(CAT)
DOC = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8") if (ROOT / "docs" / "errors.md").exists() else ""


@pytest.fixture(scope="module")
def base_ns():
    with CAT.quiet():
        return CAT.namespace()


@contextlib.contextmanager
def forward_counter():
    """Count every nn.Module forward call (any model) inside the block."""
    calls = []
    h = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__))
    try:
        yield calls
    finally:
        h.remove()


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def hooks_of(model: torch.nn.Module) -> list[str]:
    out = []
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            if getattr(mod, attr, None):
                out.append(f"{name or '<root>'}.{attr}")
    return out


def _norm(msg: str) -> str:
    """Mask decimals so that a last-digit difference across machines does not fail the page check."""
    return re.sub(r"-?\d+\.\d+(?:e[-+]?\d+)?", "<num>", msg)


@pytest.mark.parametrize("entry", CAT.ENTRIES, ids=[e.key for e in CAT.ENTRIES])
def test_catalogue_entry(entry, base_ns, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = dict(base_ns)
    with CAT.quiet():
        exec(entry.setup, ns)
    before = files_under(tmp_path)
    models = [v for v in ns.values() if isinstance(v, hp.HookedModel)]
    hooks_before = [hooks_of(v.hf_model) for v in models]  # a user's own hooks (foreign-hook) stay as they were
    with forward_counter() as calls, CAT.quiet(), pytest.raises(hp.HydraProbeError) as info:
        exec(entry.code, ns)
    err = info.value
    assert type(err).__name__ == entry.error, f"{entry.key}: raised {type(err).__name__}: {err}"
    assert isinstance(err, getattr(hp, entry.error))
    msg = str(err)
    for word in entry.words:
        assert word in msg, f"{entry.key}: {word!r} not in {msg!r}"
    assert "\n" not in msg and len(msg) < 600
    if entry.before_work:
        assert calls == [], f"{entry.key}: {len(calls)} module calls ran before the error"
    assert files_under(tmp_path) == before, "the failed call left files behind"
    assert [hooks_of(v.hf_model) for v in models] == hooks_before
    # the page shows this very message
    assert not entry.portable or _norm(f"{type(err).__name__}: {msg}") in _norm(DOC), (
        "docs/errors.md is out of date: run `python analyses/error_catalogue.py > docs/errors.md`")


def test_catalogue_covers_the_issue_list():
    keys = {e.key for e in CAT.ENTRIES} | {e.key for e in CAT.CLI_ENTRIES}
    wanted = {"unknown-component", "layer-out-of-range", "head-out-of-range", "foreign-component",
              "unsupported-architecture", "not-causal", "unequal-lengths", "multi-token-answer",
              "answer-not-in-vocabulary", "empty-task", "zero-prompts", "cli-zero-prompts", "equal-metrics",
              "nan-weights", "inf-weights", "metric-nan", "metric-wrong-shape", "unknown-value", "unknown-metric",
              "unknown-scale", "unknown-direction", "cli-non-empty-out", "jsonl-malformed-line", "missing-device",
              "cli-missing-device", "cli-jsonl-line", "out-of-memory"}
    assert wanted <= keys, wanted - keys
    # every entry of the page has an anchor
    for e in CAT.ENTRIES + CAT.CLI_ENTRIES:
        assert f'id="{e.key}"' in DOC


# ---------------------------------------------------------------------- memory

def _oom_after(ad, max_rows: int, log: list):
    """Make ``ad.run_blocks`` fail like a full device when the stacked batch exceeds ``max_rows``."""
    real = ad.run_blocks

    def run_blocks(prefix, start, copies, hidden=None, stop=None, **kw):
        rows = copies * prefix.batch
        log.append(rows)
        if rows > max_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {rows} rows)")
        return real(prefix, start, copies, hidden, stop, **kw)

    return run_blocks


def test_out_of_memory_halves_the_batch_and_gives_the_same_numbers(monkeypatch):
    m = tiny.model("gpt2", layers=2, heads=2, d=16)
    task = tiny.ioi(m, 4)
    free = hp.self_repair(m, task, "all", value="resample", seed=3)
    log: list[int] = []
    monkeypatch.setattr(m.adapter, "run_blocks", _oom_after(m.adapter, 3, log))
    tight = hp.self_repair(m, task, "all", value="resample", seed=3)
    assert max(log) > 3 and any(r <= 3 for r in log), "the simulated limit never bit"
    # the same numbers up to float32 summation order (a different batch size may reorder a matmul's sums)
    a, b = free.to_frame(), tight.to_frame()
    assert a[["component", "prompt"]].equals(b[["component", "prompt"]])
    num = a.select_dtypes("number").columns
    assert abs(a[num].to_numpy() - b[num].to_numpy()).max() < 1e-6
    ca, cb = free.contributions(), tight.contributions()
    assert ca[["component", "downstream", "prompt"]].equals(cb[["component", "downstream", "prompt"]])
    assert abs(ca.delta_de.to_numpy() - cb.delta_de.to_numpy()).max() < 1e-6
    assert hooks_of(m.hf_model) == []


def test_out_of_memory_in_the_baseline_is_a_resource_error(monkeypatch):
    m = tiny.model("gpt2", layers=2, heads=2, d=16)
    task = tiny.ioi(m, 4)

    def prefix(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(m.adapter, "prefix", prefix)
    with pytest.raises(hp.ResourceError, match="does not fit in memory.*--n-prompts"):
        hp.ablate(m, task, "heads")


def test_runtime_error_out_of_memory_is_recognised(monkeypatch):
    m = tiny.model("gpt2", layers=2, heads=2, d=16)
    task = tiny.ioi(m, 4)

    def run_blocks(*a, **k):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(m.adapter, "run_blocks", run_blocks)
    with pytest.raises(hp.ResourceError):
        hp.ablate(m, task, "heads")
    # other runtime errors are not disguised as memory errors
    monkeypatch.setattr(m.adapter, "run_blocks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):
        hp.ablate(m, task, "heads")
    assert hooks_of(m.hf_model) == []


# ---------------------------------------------------------------------- safe loading and saving

PACKAGE = ROOT / "hydra_probe"


def _sources():
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))]


def test_package_never_unpickles_or_pickles():
    bad = []
    for p, src in _sources():
        for i, line in enumerate(src.splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bimport (c?pickle|dill|joblib)\b|\bfrom (c?pickle|dill|joblib) import\b", code):
                bad.append(f"{p.name}:{i}: {line.strip()}")
            if re.search(r"\bpickle\.|\.to_pickle\(|read_pickle\(|allow_pickle\s*=\s*True", code):
                bad.append(f"{p.name}:{i}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                bad.append(f"{p.name}:{i}: {line.strip()}")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                bad.append(f"{p.name}:{i}: {line.strip()}")
    assert bad == [], "unsafe loading or saving in the package:\n" + "\n".join(bad)


def test_loading_defaults_to_safetensors_and_no_remote_code(tmp_path, monkeypatch):
    assert inspect.signature(hp.load_model).parameters["trust_remote_code"].default is False
    hf = tiny.hf_model("gpt2", layers=1, heads=2, d=16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tiny.tokenizer().save_pretrained(tmp_path)
    import transformers as tf

    seen = {}
    real_model, real_tok = tf.AutoModelForCausalLM.from_pretrained, tf.AutoTokenizer.from_pretrained

    def model_fp(path, **kw):
        seen["model"] = kw
        return real_model(path, **kw)

    def tok_fp(path, **kw):
        seen["tokenizer"] = kw
        return real_tok(path, **kw)

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", model_fp)
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", tok_fp)
    m = hp.load_model(str(tmp_path))
    assert seen["model"]["use_safetensors"] is True
    assert seen["model"]["trust_remote_code"] is False
    assert seen["tokenizer"]["trust_remote_code"] is False
    assert m.n_layers == 1


def test_results_are_saved_as_json(tmp_path):
    m = tiny.model("gpt2", layers=2, heads=2, d=16)
    task = tiny.ioi(m, 4)
    r = hp.self_repair(m, task, ["L0H0", "MLP0"])
    path = r.save(tmp_path / "sr")
    assert path.suffix == ".json"
    raw = path.read_bytes()
    assert raw.lstrip().startswith(b"{") and b"\x80" not in raw  # no pickle protocol header
    obj = json.loads(raw)
    assert obj["kind"] == "self_repair" and obj["provenance"]["value"] == "mean"
    back = hp.load_result(path)
    assert type(back) is hp.SelfRepair
    assert back.to_frame()["self_repair"].to_numpy() == pytest.approx(r.to_frame()["self_repair"].to_numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["sr.json"]  # no temporary file left


# ---------------------------------------------------------------------- atomic folders

def test_atomic_folder_leaves_nothing_on_error_and_keeps_an_existing_folder(tmp_path):
    from hydra_probe.io import atomic_folder

    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(out) as tmp:
            (tmp / "report.md").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        with atomic_folder(out) as tmp:
            (tmp / "report.md").write_text("new")
    assert files_under(tmp_path) == {"report", "report/keep.txt"}
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "report.md").write_text("new")
    assert files_under(tmp_path) == {"report", "report/report.md"}


@pytest.mark.parametrize("can_swap", [True, False])
def test_atomic_folder_overwrite_swaps_or_falls_back(tmp_path, monkeypatch, can_swap):
    from hydra_probe import io

    if not can_swap:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with io.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert files_under(tmp_path) == {"report", "report/new.txt"}
    assert (out / "new.txt").read_text() == "new"
