"""Benchmark: all-heads ablate / self_repair sweeps against a plain nnsight loop.

Times, in one run and on the same model and prompts, hydra_probe's all-heads
``ablate`` and ``self_repair`` (zero ablation) against what a user writes by
hand: one full nnsight forward per head (full logits, the metric read at the
last position). Prints one line per shape and op:

    shape=NAME op=ablate|self_repair ratio=R max_abs_diff=D

ratio = package time / loop time; max_abs_diff compares per-prompt total
effects (the loop runs GPT-2's own gelu_new formula, the package PyTorch's fused tanh GELU: a float32
rounding-level difference). The package is given the very model object the loop's nnsight.LanguageModel
wraps (nnsight's instance forward on every module does not keep the package from its fused GELU).

The same all-heads ablation with the runner's restart at the output projection switched off (``Runner.fast_attention = False``):

    shape=NAME op=ablate_fast_vs_plain_restart ratio=R max_abs_diff=D

Then attribution against exact activation patching of every head
and MLP (denoising), measured in the same run:

    shape=NAME op=atp|atp* ratio=R spearman=S recall=K/k

ratio = estimate time / exact time; recall = how many of the exact top-k
(by |effect|) the estimate ranks in its top 2k. Then AtP* of every head's and MLP's mean ablation
(``attribution_ablate``, what exact="auto" reads for the ablation side) against exact ablation:

    shape=NAME op=atp*_ablation ratio=R spearman=S largest_miss=M recall=K/k

(M in metric units, with the mean clean metric beside it). Then AtP*'s engine against
its plain reference (``Runner.fast_qk`` and ``Runner.shared_gradients`` off:
one full forward per sender for the QK fix, one stacked copy per GradDrop read):

    shape=NAME op=atp*_engine ratio=R max_abs_diff=D

ratio = new time / old time; max_abs_diff compares the estimates. Then the QK fix's pattern route against
its output route (``Runner.qk_patterns`` on / off; the QK fix's own time in both directions):

    shape=NAME op=qk_fix_patterns_vs_outputs ratio=R max_abs_diff=D
 With the ablation part, before the
attribution lines, the all-heads sweeps with the final block's attention for the last query only against
the same sweeps computing it in full (``Runner.last_query_only`` on / off):

    shape=NAME op=ablate_last_query_vs_full|self_repair_last_query_vs_full ratio=R max_abs_diff=D

Then the full
report (``hp.triangulate``, every section) with exact="auto" and exact="all" on
a model of each shape (``--report-prompts`` prompt pairs, 32 by default: for
gpt2-small the GPT-2-small-sized model of 144 heads and 50257 tokens; prompts
whose corruption changes one token), with analyses/bench_report.py's lines:

    shape=NAME exact=all|auto wall_s=W cpu_s=C swept=K/N  (and one step=STEP line per step)
    shape=NAME ratio auto/all wall=R cpu=C
    shape=NAME top10 verdicts agree=A/10 (by the exhaustive run's importance) [...]
    shape=NAME non-minor verdicts agree=A/B swept=S/B; all verdicts agree=...

Random-weight configs, no downloads. Usage:
    python analyses/bench_sweep.py [--shapes gpt2-small,small] [--threads 2] [--parts ablation,attribution,report]
                                   [--prompts 16] [--report-prompts 32] [--report-modes all,auto]

(``--parts``: which parts, all three by default: ``ablation`` (the plain nnsight loop lines), ``attribution``
(the op=atp, op=atp*, op=atp*_engine and op=qk_fix_patterns_vs_outputs lines), ``report``; ``--atp-only`` is ``--parts attribution``.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import transformers as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import hydra_probe as hp  # noqa: E402
from hydra_probe.tasks.task import Task  # noqa: E402

SHAPES = {
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257),
    "small": dict(n_layer=6, n_head=8, n_embd=256, vocab_size=50257),
}
#: the report part's model: bench_report.py's shape of that name (other shapes: a GPT-2 of this script's config)
REPORT_SHAPES = {"gpt2-small": "gpt2"}
PARTS = ("ablation", "attribution", "report")


def make(shape: str, n_prompts: int, n_tokens: int, seed: int = 0):
    from tokenizers import Tokenizer, models

    torch.manual_seed(seed)
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(n_positions=64, **SHAPES[shape])).eval()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                     unk_token="[UNK]")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf.config.vocab_size, (n_prompts, n_tokens), generator=g)
    corr = torch.randint(0, hf.config.vocab_size, (n_prompts, n_tokens), generator=g)
    ans = torch.randint(0, hf.config.vocab_size, (n_prompts,), generator=g)
    alt = (ans + 1) % hf.config.vocab_size
    task = Task([{"clean": "", "corrupted": "", "answer": "", "alternative": ""}] * n_prompts, "random", "random",
                seed, list(ids), list(corr), ans, alt)
    return hf, tok, task


def plain_loop(lm, hf, task) -> torch.Tensor:
    """One full nnsight forward per head: what a user writes. Returns TE (heads, prompts)."""
    L, H = hf.config.n_layer, hf.config.n_head
    dh = hf.config.n_embd // H
    ids = torch.stack(task.clean_ids)
    a, b = task.answer_ids, task.alternative_ids
    r = torch.arange(len(a))
    with torch.no_grad():
        with lm.trace(ids):
            clean_logits = lm.output.logits[:, -1].save()
        clean = clean_logits[r, a] - clean_logits[r, b]
        te = torch.empty(L * H, len(a))
        for layer in range(L):
            for head in range(H):
                with lm.trace(ids):
                    lm.transformer.h[layer].attn.c_proj.input[:, :, head * dh:(head + 1) * dh] = 0
                    logits = lm.output.logits.save()
                m = logits[r, -1, a] - logits[r, -1, b]
                te[layer * H + head] = clean - m
    return te


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="gpt2-small,small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--atp-only", action="store_true", help="only the attribution lines (= --parts attribution)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which parts, comma-separated ({', '.join(PARTS)})")
    ap.add_argument("--report-prompts", type=int, default=32, help="prompt pairs of the report part")
    ap.add_argument("--report-modes", default="all,auto", help="the report part's runs, in order (all, auto)")
    args = ap.parse_args(argv)
    parts = {"attribution"} if args.atp_only else set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown parts {', '.join(sorted(parts - set(PARTS)))}; choose from {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import nnsight

    for shape in args.shapes.split(",") if parts & {"ablation", "attribution"} else []:
        hf, tok, task = make(shape, args.prompts, args.tokens)
        lm = nnsight.LanguageModel(hf, tokenizer=tok)
        model = hp.load_model(hf, tokenizer=tok)
        if "ablation" not in parts:
            _attribution_lines(shape, model, task, args.top_k)
            continue
        plain_loop(lm, hf, task.subset(range(2)))  # warm-up
        t0 = time.perf_counter()
        te_loop = plain_loop(lm, hf, task)
        t_loop = time.perf_counter() - t0
        for op in ("ablate", "self_repair"):
            fn = hp.ablate if op == "ablate" else hp.self_repair
            t0 = time.perf_counter()
            res = fn(model, task, "heads", value="zero", progress=False)
            t_pkg = time.perf_counter() - t0
            te = torch.tensor(res.to_frame().total_effect.to_numpy()).view(-1, len(task))
            diff = float((te - te_loop.double()).abs().max())
            print(f"shape={shape} op={op} ratio={t_pkg / t_loop:.3f} max_abs_diff={diff:.2e}"
                  f"  (package {t_pkg:.2f}s, loop {t_loop:.2f}s)", flush=True)
        from hydra_probe.runner import Runner

        times, tes = {}, {}
        for flag in (False, True):
            Runner.fast_attention = flag
            t0 = time.perf_counter()
            res = hp.ablate(model, task, "heads", value="zero", progress=False)
            times[flag] = time.perf_counter() - t0
            tes[flag] = torch.tensor(res.to_frame().total_effect.to_numpy())
        diff = float((tes[True] - tes[False]).abs().max())
        print(f"shape={shape} op=ablate_fast_vs_plain_restart ratio={times[True] / times[False]:.3f} "
              f"max_abs_diff={diff:.2e}  (fast {times[True]:.2f}s, plain {times[False]:.2f}s)", flush=True)
        for op in ("ablate", "self_repair"):  # the final block's attention for the last query only, or in full
            fn = hp.ablate if op == "ablate" else hp.self_repair
            for flag in (False, True):
                Runner.last_query_only = flag
                t0 = time.perf_counter()
                res = fn(model, task, "heads", value="zero", progress=False)
                times[flag] = time.perf_counter() - t0
                tes[flag] = torch.tensor(res.to_frame().total_effect.to_numpy())
            diff = float((tes[True] - tes[False]).abs().max())
            print(f"shape={shape} op={op}_last_query_vs_full ratio={times[True] / times[False]:.3f} "
                  f"max_abs_diff={diff:.2e}  (last query {times[True]:.2f}s, full {times[False]:.2f}s)", flush=True)
        if "attribution" in parts:
            _attribution_lines(shape, model, task, args.top_k)
    for shape in args.shapes.split(",") if "report" in parts else []:
        _report_lines(shape, args.report_prompts, args.tokens, args.report_modes)


def _report_lines(shape: str, n_prompts: int, n_tokens: int, modes: str) -> None:
    """The full report with exact="auto" and "all" on a random model of ``shape``: bench_report.py's make
    (prompts whose corruption changes one token, answers the tokens that change moves most) and compare."""
    import bench_report

    name = REPORT_SHAPES.get(shape, shape)
    if name not in bench_report.SHAPES:  # another GPT-2 shape of this script
        bench_report.SHAPES[name] = (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_positions=64, **SHAPES[shape]),
                                     n_prompts)
    model, task = bench_report.make(name, n_prompts, n_tokens)
    bench_report.compare(shape, model, task, modes)


def _attribution_lines(shape: str, model, task, top_k: int) -> None:
    """AtP and AtP* against exact activation patching of every head and MLP, and AtP*'s engine against its
    plain reference (the op=atp, op=atp*, op=atp*_engine and op=qk_fix_patterns_vs_outputs lines)."""
    from hydra_probe.runner import Runner

    t0 = time.perf_counter()
    exact = hp.activation_patch(model, task, "all", "denoise", progress=False)
    t_exact = time.perf_counter() - t0
    ests = {}
    for method in ("atp", "atp*"):
        t0 = time.perf_counter()
        est = hp.attribution_patch(model, task, "all", "denoise", method=method, progress=False)
        t_est = time.perf_counter() - t0
        ests[method] = (est, t_est)
        ag = est.agreement(exact, top_k=top_k)
        print(f"shape={shape} op={method} ratio={t_est / t_exact:.3f} spearman={ag['spearman']:.3f} "
              f"recall={ag['exact_top_k_in_top_2k']}/{ag['top_k']}  (estimate {t_est:.2f}s, exact {t_exact:.2f}s)",
              flush=True)
    # AtP* of each ablation (the ablation side of exact="auto") against exact ablation
    t0 = time.perf_counter()
    ab = hp.ablate(model, task, "all", value="mean", progress=False)
    t_ab = time.perf_counter() - t0
    t0 = time.perf_counter()
    est = hp.attribution_ablate(model, task, "all", value="mean", progress=False)
    t_est = time.perf_counter() - t0
    ag = est.agreement(ab)
    ex = ab.to_frame().groupby("component", sort=False)["total_effect"].mean().abs()
    mine = est.to_frame().groupby("component", sort=False)["estimate"].mean().abs()
    k = min(top_k, len(ex))
    hits = len(set(ex.sort_values(ascending=False).index[:k]) & set(mine.sort_values(ascending=False).index[:2 * k]))
    print(f"shape={shape} op=atp*_ablation ratio={t_est / t_ab:.3f} spearman={ag['spearman']:.3f} "
          f"largest_miss={ag['largest_miss']:.3g} recall={hits}/{k}  (estimate {t_est:.2f}s, exact {t_ab:.2f}s; "
          f"{ag['component']}; mean clean metric {ab.to_frame()['clean_metric'].mean():.3g})", flush=True)
    # AtP*'s engine (QK fix on each downstream layer's attention only, one shared forward for the GradDrop
    # reads) against its plain reference (one full forward per sender, one stacked copy per read)
    Runner.fast_qk = Runner.shared_gradients = False
    try:
        t0 = time.perf_counter()
        old = hp.attribution_patch(model, task, "all", "denoise", method="atp*", progress=False)
        t_old = time.perf_counter() - t0
    finally:
        Runner.fast_qk = Runner.shared_gradients = True
    new, t_new = ests["atp*"]
    diff = float((torch.tensor(new.to_frame().estimate.to_numpy())
                  - torch.tensor(old.to_frame().estimate.to_numpy())).abs().max())
    print(f"shape={shape} op=atp*_engine ratio={t_new / t_old:.3f} max_abs_diff={diff:.2e}  "
          f"(new {t_new:.2f}s, old {t_old:.2f}s; old/exact {t_old / t_exact:.3f})", flush=True)
    # the QK fix's pattern route (each copy's softmax pattern against grad_z . V) against its output route
    # (each copy's z), both directions, timing the QK fix alone
    qk: dict[bool, list[float]] = {True: [], False: []}
    real = Runner.qk_fix

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        out = real(self, *a, **k)
        qk[Runner.qk_patterns].append(time.perf_counter() - t0)
        return out

    Runner.qk_fix = timed
    got = {}
    try:
        for flag in (False, True):
            Runner.qk_patterns = flag
            got[flag] = [hp.attribution_patch(model, task, "all", d, method="atp*", progress=False)
                         .to_frame().estimate.to_numpy() for d in ("denoise", "noise")]
    finally:
        Runner.qk_fix, Runner.qk_patterns = real, True
    diff = max(float(abs(a - b).max()) for a, b in zip(got[True], got[False]))
    print(f"shape={shape} op=qk_fix_patterns_vs_outputs ratio={sum(qk[True]) / sum(qk[False]):.3f} "
          f"max_abs_diff={diff:.2e}  (patterns {sum(qk[True]):.2f}s, outputs {sum(qk[False]):.2f}s; "
          "the QK fix alone, both directions)", flush=True)


if __name__ == "__main__":
    main()
