"""Models dispatched by accelerate (half the blocks offloaded to disk) give the in-memory numbers."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import tiny
import torch

import hydra_probe as hp

try:  # in the test extra: CI must run these tests, never skip them
    import accelerate  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("device maps need accelerate (pip install '.[test]')", allow_module_level=True)


def _same(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-5) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), atol=atol, rtol=0, err_msg=c)
        else:
            assert list(a[c]) == list(b[c]), c


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 saved with save_pretrained, and its in-memory HookedModel."""
    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    hf = tiny.hf_model("gpt2", layers=4)
    hf.save_pretrained(folder)
    tiny.tokenizer().save_pretrained(folder)
    return folder, hp.load_model(str(folder))


def _half_on_disk(hf) -> dict[str, str]:
    """Embeddings, blocks 0-1 and the (tied) unembedding on the CPU; blocks 2-3 and the final norm offloaded to disk."""
    return {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "cpu",
            "transformer.h.2": "disk", "transformer.h.3": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"}


def test_half_the_blocks_on_disk_give_the_in_memory_numbers(saved, tmp_path):
    folder, ref = saved
    off = hp.load_model(str(folder), device_map=_half_on_disk(None), offload_folder=tmp_path / "offload")
    # really dispatched: block 3's weights live on the meta device, loaded from disk only while it runs
    assert off.hf_model.transformer.h[3].mlp.c_fc.weight.device.type == "meta"
    assert off.hf_model.transformer.h[3].mlp.c_fc._hf_hook.offload
    assert off.hf_model.hf_device_map["transformer.h.2"] == "disk"
    t = tiny.ioi(ref, 6)
    _same(hp.direct_effects(ref, t).to_frame(), hp.direct_effects(off, t).to_frame())
    np.testing.assert_allclose(hp.direct_effects(ref, t).constant.to_numpy(dtype=float),
                               hp.direct_effects(off, t).constant.to_numpy(dtype=float), atol=1e-5)
    _same(hp.ablate(ref, t, "heads", "mean").to_frame(), hp.ablate(off, t, "heads", "mean").to_frame())
    a, b = hp.self_repair(ref, t, ["L0H1", "L2H0", "MLP1"], "resample"), \
        hp.self_repair(off, t, ["L0H1", "L2H0", "MLP1"], "resample")
    _same(a.to_frame(), b.to_frame())
    _same(a.contributions(), b.contributions())
    _same(hp.activation_patch(ref, t, ["L3H1", "RESID2"], per_position=False).to_frame(),
          hp.activation_patch(off, t, ["L3H1", "RESID2"], per_position=False).to_frame())
    _same(hp.path_patch(ref, t, ["L1H0"], ["L3H2", "logits"]).to_frame(),
          hp.path_patch(off, t, ["L1H0"], ["L3H2", "logits"]).to_frame())
    _same(hp.attribution_patch(ref, t, ["L2H1", "MLP3"]).to_frame(),
          hp.attribution_patch(off, t, ["L2H1", "MLP3"]).to_frame())
    # the offloaded weights went back to the meta device after every read
    assert off.hf_model.transformer.h[3].mlp.c_fc.weight.device.type == "meta"


def test_device_map_auto_passes_through(saved, monkeypatch):
    import transformers as tf

    folder, ref = saved
    seen = {}
    real = tf.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", spy)
    m = hp.load_model(str(folder), device_map="auto")
    assert seen["device_map"] == "auto"
    seen.clear()
    d = hp.load_model("default", device_map="auto")  # the shipped model too
    assert seen["device_map"] == "auto" and d.name == "hydra_probe/default-ioi"
    t = tiny.ioi(ref, 4)
    _same(hp.ablate(ref, t, ["L1H2", "MLP2"], "zero").to_frame(), hp.ablate(m, t, ["L1H2", "MLP2"], "zero").to_frame())


def test_an_accelerate_dispatched_model_object_works(saved, tmp_path):
    import transformers as tf

    folder, ref = saved
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, device_map=_half_on_disk(None),
                                                 offload_folder=str(tmp_path / "off"))
    m = hp.load_model(hf, tokenizer=tiny.tokenizer())
    t = tiny.ioi(ref, 4)
    _same(hp.self_repair(ref, t, ["L2H3"], "mean").to_frame(), hp.self_repair(m, t, ["L2H3"], "mean").to_frame())


def test_bad_placements_fail_before_loading(saved, tmp_path, monkeypatch):
    folder, _ = saved
    import transformers as tf

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the placement was checked")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", no_load)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: use a path under a file instead
            locked = tmp_path / "a_file"
            locked.write_text("")
            locked = locked / "offload"
        with pytest.raises(hp.OptionError, match="cannot be written"):
            hp.load_model(str(folder), device_map=_half_on_disk(None), offload_folder=locked)
    finally:
        (tmp_path / "locked").chmod(0o700)
    n = torch.cuda.device_count()
    with pytest.raises(hp.OptionError, match=f"cuda:{n}" if n else "CUDA is not available"):
        hp.load_model(str(folder), device_map={"transformer": f"cuda:{n}", "lm_head": "cpu"})
    with pytest.raises(hp.OptionError, match="does not exist|not available"):
        hp.load_model(str(folder), device_map=f"cuda:{n}")
    with pytest.raises(hp.OptionError, match="not a torch device"):
        hp.load_model(str(folder), device_map={"transformer": "gpu0"})
    with pytest.raises(hp.OptionError, match="offload_folder"):
        hp.load_model(str(folder), device_map=_half_on_disk(None))
    with pytest.raises(hp.OptionError, match="needs a device_map"):
        hp.load_model(str(folder), offload_folder=tmp_path / "x")
    with pytest.raises(hp.OptionError, match="not both"):
        hp.load_model(str(folder), device="cpu", device_map="auto")
    with pytest.raises(hp.OptionError, match="does not exist|not available"):
        hp.load_model(str(folder), device=f"cuda:{n}")
