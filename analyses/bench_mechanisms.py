"""Benchmark: the cost of repair_mechanisms relative to self_repair, measured in one run.

Times, on the same model, prompts and components, ``self_repair`` and
``repair_mechanisms`` (each split order) and prints one line per shape and op:

    shape=NAME op=repair_mechanisms[ORDER] ... self_repair_s=S mechanisms_s=M ratio_wall=R ratio_cpu=C

ratio_wall / ratio_cpu = repair_mechanisms time / self_repair time, wall clock and
this process's CPU time (best of ``--repeats`` interleaved runs; on a shared
machine the CPU ratio is the steadier one).
Both run one stacked ablated forward per component restarted at its layer;
repair_mechanisms adds eager attention (which returns its weights), the
captures of each downstream layer's last-query weights (and, for
``values_first``/``symmetric``, value vectors at every position) and their
reduction. Random-weight configs, no downloads. Usage:
    python analyses/bench_mechanisms.py [--shapes small,gpt2-small] [--threads 2] [--prompts 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import hydra_probe as hp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_sweep import make as make_random  # noqa: E402


def make(shape: str, n_prompts: int, n_tokens: int, seed: int = 0):
    """The model wrapper and task of bench_sweep's random GPT-2 of ``shape``."""
    hf, tok, task = make_random(shape, n_prompts, n_tokens, seed)
    return hp.load_model(hf, tokenizer=tok), task


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--components", default="all")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    for shape in a.shapes.split(","):
        bench(shape, a)


def bench(shape: str, a: argparse.Namespace) -> None:
    m, task = make(shape, a.prompts, a.tokens)
    kw = dict(value="mean", progress=False)
    ops = {"self_repair": lambda: hp.self_repair(m, task, a.components, **kw)}
    for order in ("pattern_first", "values_first", "symmetric"):
        ops[order] = lambda o=order: hp.repair_mechanisms(m, task, a.components, order=o, **kw)
    ops["self_repair"]()  # warm-up (imports, allocator)
    best = {k: (float("inf"), float("inf")) for k in ops}
    for _ in range(a.repeats):  # interleaved, so that load from elsewhere hits every op alike
        for k, fn in ops.items():
            w, c = timed(fn)
            best[k] = (min(best[k][0], w), min(best[k][1], c))
    sw, sc = best["self_repair"]
    for order in ("pattern_first", "values_first", "symmetric"):
        w, c = best[order]
        sys.stdout.write(f"shape={shape} op=repair_mechanisms[{order}] components={a.components} prompts={a.prompts} "
                         f"tokens={a.tokens} self_repair_s={sw:.3f} mechanisms_s={w:.3f} ratio_wall={w / sw:.2f} "
                         f"ratio_cpu={c / sc:.2f}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
