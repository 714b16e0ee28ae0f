"""Run the main analyses on CUDA (and on a model sharded over two GPUs when there are two) and compare with the CPU.

    python analyses/gpu_check.py [--model default|FOLDER|HUB_NAME] [--n-prompts 16] [--atol 1e-4]

Prints, per analysis and device setup, the largest absolute difference from
the CPU numbers, and the token budget chosen from the device's free memory.
Exits 1 when a difference exceeds ``--atol``, 0 otherwise, and prints a skip
message (exit 0) when no CUDA device is present. Run it after changes to the
runner, the adapter or the loaders, and before a release, on a machine with a
GPU (CI has none).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch


def analyses(task: Any) -> dict[str, Callable[[Any], pd.DataFrame]]:
    import hydra_probe as hp

    heads = ["L1H0", "L2H1", "L3H2"]
    return {
        "direct_effects": lambda m: hp.direct_effects(m, task).to_frame(),
        "direct_effects.constant": lambda m: hp.direct_effects(m, task).constant,
        "ablate(heads, mean)": lambda m: hp.ablate(m, task, "heads", "mean").to_frame(),
        "ablate(resample)": lambda m: hp.ablate(m, task, heads, "resample").to_frame(),
        "self_repair": lambda m: hp.self_repair(m, task, heads, "mean").to_frame(),
        "self_repair.contributions": lambda m: hp.self_repair(m, task, heads, "mean").contributions(),
        "activation_patch": lambda m: hp.activation_patch(m, task, "heads", per_position=False).to_frame(),
        "path_patch": lambda m: hp.path_patch(m, task, ["L0H1", "L1H0"], ["L3H2", "logits"]).to_frame(),
        "attribution_patch": lambda m: hp.attribution_patch(m, task, "heads").to_frame(),
    }


def largest_difference(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, str]:
    """The largest absolute difference over the float columns of two frames of the same shape, and its column."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return float("inf"), "shape or columns differ"
    worst, where = 0.0, ""
    for c in a.columns:
        if a[c].dtype.kind == "f":
            d = float(np.nanmax(np.abs(a[c].to_numpy() - b[c].to_numpy()))) if len(a) else 0.0
            if d > worst:
                worst, where = d, c
        elif list(a[c]) != list(b[c]):
            return float("inf"), f"column {c} differs"
    return worst, where


def sharded_map(model: Any) -> dict[str, int]:
    """Embeddings, the first half of the blocks and the (often tied) unembedding on GPU 0; the other blocks and
    the final norm on GPU 1."""
    hf, ad = model.hf_model, model.adapter
    names = {id(m): n for n, m in hf.named_modules()}
    blocks = names[id(ad.blocks[0])].rsplit(".", 1)[0]          # e.g. transformer.h, model.layers
    parent, _, leaf = blocks.rpartition(".")
    base = hf.get_submodule(parent) if parent else hf
    dm: dict[str, int] = {n: 0 for n, _ in hf.named_children() if n != parent.split(".")[0]}
    dm.update({f"{parent}.{n}" if parent else n: 0 for n, _ in base.named_children() if n != leaf})
    half = ad.n_layers // 2
    dm.update({f"{blocks}.{l}": 0 if l < half else 1 for l in range(ad.n_layers)})
    dm[names[id(ad.final_norm)]] = 1
    return dm


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'default' (the shipped model), a folder or a cached hub name")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--atol", type=float, default=1e-4, help="largest difference from the CPU accepted (float32)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the script itself without a GPU: the 'GPU' setups run on the CPU (differences 0)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.dry_run:
        print("gpu_check: skipped - no CUDA device here (torch.cuda.is_available() is False). "
              "Run it on a machine with a GPU: python analyses/gpu_check.py")
        return 0
    import hydra_probe as hp

    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32
    torch.backends.cudnn.allow_tf32 = False
    cpu = hp.load_model(a.model)
    task = hp.tasks.ioi(cpu, n_prompts=a.n_prompts, seed=0)
    gpu = (lambda i: "cpu") if a.dry_run else (lambda i: f"cuda:{i}")
    setups: dict[str, Callable[[], Any]] = {gpu(0): lambda: hp.load_model(a.model, device=gpu(0))}
    n_gpu = 2 if a.dry_run else torch.cuda.device_count()
    if n_gpu >= 2:
        from hydra_probe.zoo import DEFAULT_MODEL_DIR

        folder = str(DEFAULT_MODEL_DIR) if a.model == "default" else a.model
        dm = {k: gpu(v) if a.dry_run else v for k, v in sharded_map(cpu).items()}
        setups[f"sharded {gpu(0)}+{gpu(1)}"] = lambda: hp.load_model(folder, device_map=dm)
    else:
        print(f"gpu_check: one CUDA device ({torch.cuda.get_device_name(0)}); the two-GPU sharded check is skipped")
    ref: dict[str, pd.DataFrame] = {}
    for name, fn in analyses(task).items():
        ref[name] = fn(cpu)
    failed = False
    for setup, load in setups.items():
        m = load()
        free = "" if a.dry_run else f" (free memory {torch.cuda.mem_get_info(0)[0] / 2**30:.1f} GiB on cuda:0)"
        print(f"\n== {setup}: {m!r}; token budget {m.token_budget()}{free}")
        for name, fn in analyses(task).items():
            t0 = time.perf_counter()
            try:
                got = fn(m)
            except Exception as e:  # noqa: BLE001 - report every failure, then go on
                print(f"  {name:28s} FAILED: {type(e).__name__}: {e}")
                failed = True
                continue
            d, col = largest_difference(ref[name], got)
            bad = d > a.atol
            failed |= bad
            print(f"  {name:28s} largest |GPU - CPU| = {d:.3g} ({col}){'  > atol' if bad else ''}"
                  f"  [{time.perf_counter() - t0:.2f} s]")
        del m
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\ngpu_check:", "FAILED (differences above --atol or errors)" if failed else "all within --atol")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
