"""Benchmark: the cost of comparing every condition, relative to one condition, measured in one run.

On the shipped model (IOI, all heads) times, one after the other in the same
process:

* ``one``: ``compare_conditions`` with a single condition (swap, mean, logit_diff);
* ``all``: ``compare_conditions`` with the default grid (swap, abc x zero, mean,
  resample x logit_diff, logprob: 12 conditions);
* ``separate``: the 12 single-condition analyses run on their own
  (``self_repair`` or ``ablate``, and ``activation_patch`` in both directions,
  per condition), which is what the comparison replaces.

Prints one line per measurement with wall and CPU seconds and the ratio to
``one`` (CPU time; the machine may be shared: ``one`` and ``all`` run
``--repeats`` times, interleaved, and the fastest counts), then the saving of
``all`` against ``separate``. Usage:
    python analyses/bench_conditions.py [--n-prompts 32] [--threads 2] [--components heads]

Measured 2026-12-02 on a shared 2-core machine (load 6-10; CPU seconds, fastest of 3): one condition
5.6 s, all 12 conditions 13.2 s (2.4x), the 12 conditions run separately 120 s (21.7x): shared runs save 89%.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import hydra_probe as hp

GRID = dict(corruptions=("swap", "abc"), values=("zero", "mean", "resample"), metrics=("logit_diff", "logprob"))


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def separate(model, tasks, comps) -> None:
    """Every condition's single analyses, each condition on its own (no shared runs)."""
    for c in GRID["corruptions"]:
        for v in GRID["values"]:
            for m in GRID["metrics"]:
                for d in ("denoise", "noise"):
                    hp.activation_patch(model, tasks[c], comps, d, metric=m, progress=False)
                if hp.METRICS[m].linear:
                    hp.self_repair(model, tasks[c], comps, value=v, metric=m, progress=False)
                else:
                    hp.ablate(model, tasks[c], comps, value=v, metric=m, progress=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--components", default="heads")
    ap.add_argument("--repeats", type=int, default=3, help="runs of 'one' and 'all' (the fastest counts)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hp.load_default_model()
    tasks = {c: hp.tasks.ioi(model, n_prompts=args.n_prompts, corruption=c, seed=0) for c in GRID["corruptions"]}
    comps = args.components
    hp.compare_conditions(model, tasks["swap"], ["L0H0"], corruptions=("swap",), values=("mean",),
                          metrics=("logit_diff",), progress=False)  # warm-up
    ones, alls = [], []
    for _ in range(args.repeats):  # interleaved; the fastest of each (the machine may be shared)
        ones.append(timed(lambda: hp.compare_conditions(model, tasks["swap"], comps, corruptions=("swap",),
                                                        values=("mean",), metrics=("logit_diff",), progress=False)))
        alls.append(timed(lambda: hp.compare_conditions(model, tasks["swap"], comps, progress=False, **GRID)))
    _, w1, c1 = min(ones, key=lambda r: r[2])
    res, wa, ca = min(alls, key=lambda r: r[2])
    _, ws, cs = timed(lambda: separate(model, tasks, comps))
    n = len(res.to_frame().drop_duplicates(["corruption", "value", "metric"]))
    print(f"model={model.name} components={comps} ({res.to_frame()['component'].nunique()}) n_prompts={args.n_prompts} "
          f"threads={args.threads}")
    print(f"one        conditions=1  wall={w1:6.2f}s cpu={c1:6.2f}s ratio=1.00")
    print(f"all        conditions={n} wall={wa:6.2f}s cpu={ca:6.2f}s ratio={ca / c1:.2f}")
    print(f"separate   conditions={n} wall={ws:6.2f}s cpu={cs:6.2f}s ratio={cs / c1:.2f}")
    print(f"all conditions cost {ca / c1:.1f}x one condition; run separately they cost {cs / c1:.1f}x "
          f"(shared runs save {1 - ca / cs:.0%})")


if __name__ == "__main__":
    main()
