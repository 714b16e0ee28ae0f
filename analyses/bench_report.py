"""Benchmark: the full triangulation report with exact="auto" against exact="all", measured in one run.

On a random-weight model (no downloads) of a real model's shape, runs
``hp.triangulate`` (every section, defaults: all heads, mean ablation, top 5,
"Why it repairs") once with ``exact="all"`` (every component swept exactly)
and once with ``exact="auto"`` (the default: AtP* and the direct effects rule
components out), on the same prompts, and prints:

    shape=NAME exact=all|auto wall_s=W cpu_s=C swept=K/N denoise=D noise=E ablation=A
    shape=NAME exact=all|auto step=STEP wall_s=S        (rep.timings, one line per step)
    shape=NAME ratio auto/all wall=R cpu=C
    shape=NAME top10 verdicts agree=A/10 (by the exhaustive run's importance) [component: all -> auto ...]
    shape=NAME non-minor verdicts agree=A/B swept=S/B
    shape=NAME ratio auto/all median of K rounds wall=R cpu=C (wall: R1 R2 ...)   (with --repeat K > 1)

cpu_s is this process's CPU time (steadier than wall clock on a shared
machine). Shapes:

* ``gpt2``: GPT-2 small (12 layers x 12 heads = 144 heads, d_model 768,
  vocabulary 50257), 32 prompt pairs by default.
* ``smol``: a Llama shaped like SmolLM-135M (30 layers x 9 heads = 270 heads,
  3 key/value heads, d_model 576, MLP 1536, vocabulary 49152, tied
  embeddings), 16 prompt pairs by default.
* ``qwen2``: a Qwen2 shaped like Qwen2-0.5B (24 layers x 14 heads = 336 heads,
  2 key/value heads, d_model 896, MLP 4864, vocabulary 151936, tied
  embeddings, q/k/v biases), 16 prompt pairs by default.
* ``gemma3``: a Gemma-3 shaped like Gemma-3-270M (18 layers x 4 heads = 72
  heads of dimension 256, one key/value head, d_model 640, MLP 2048,
  vocabulary 262144, sandwich norms, q/k norms), 16 prompt pairs by default.

The prompts are random tokens; the corrupted prompt changes one token (at
``--position``), and each pair's answer and alternative are the tokens whose
logits that change raises and lowers most at the last position, so the
clean - corrupted gap is the corruption's effect and not noise.
Usage:
    python analyses/bench_report.py [--shape gpt2|smol|qwen2|gemma3] [--prompts N] [--position P] [--modes all,auto] [--threads 2]
        [--repeat K] [--every-row] [--no-share]

(``--repeat K``: K rounds, all then auto, then auto then all, and so on, each round's ratio and their median:
this machine's speed drifts by 10-30 % within minutes, and alternating the order spreads the drift over both
modes.)

(``--no-share``: the analyses do not share their unedited runs, the plain reference of
``effects.common.shared_runs``; ``--every-row``: no stacked forward is restricted to the rows after the
clean and corrupted prompts' shared prefix, ``Runner.suffix_rows = False``; same numbers.) ``compare`` is reused by bench_sweep.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any

import torch
import transformers as tf

import hydra_probe as hp
from hydra_probe.report.triangulation import MEASUREMENTS
from hydra_probe.tasks.task import Task

SHAPES = {
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=64), 32),
    "smol": (tf.LlamaConfig, tf.LlamaForCausalLM,
             dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                  intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=256),
             16),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM,
              dict(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, hidden_size=896,
                   intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=256),
              16),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
               dict(num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                    hidden_size=640, intermediate_size=2048, vocab_size=262144, sliding_window=512,
                    query_pre_attn_scalar=256, max_position_embeddings=256),
               16),
}


def make(shape: str, n_prompts: int, n_tokens: int = 16, position: int = 5, seed: int = 0) -> tuple[hp.HookedModel,
                                                                                                     Task]:
    """A random model of ``shape`` and a task whose corruption changes the token at ``position`` (see module doc)."""
    from tokenizers import Tokenizer, models

    cfg_cls, lm_cls, cfg, _ = SHAPES[shape]
    torch.manual_seed(seed)
    hf = lm_cls(cfg_cls(**cfg)).eval()
    V = hf.config.vocab_size
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                     unk_token="[UNK]")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_prompts, n_tokens), generator=g)
    corr = ids.clone()
    corr[:, position] = (ids[:, position] + torch.randint(1, V, (n_prompts,), generator=g)) % V  # always another token
    with torch.no_grad():
        d = hf(ids).logits[:, -1] - hf(corr).logits[:, -1]
    ans, alt = d.argmax(-1), d.argmin(-1)
    task = Task([{"clean": "", "corrupted": "", "answer": "", "alternative": ""}] * n_prompts, "random",
                f"one token (position {position})", seed, list(ids), list(corr), ans, alt)
    return hp.load_model(hf, tokenizer=tok), task


def run(model: hp.HookedModel, task: Task, exact: str) -> tuple[hp.TriangulationReport, float, float]:
    w, c = time.perf_counter(), time.process_time()
    rep = hp.triangulate(model, task, exact=exact, progress=False)
    return rep, time.perf_counter() - w, time.process_time() - c


def compare(shape: str, model: hp.HookedModel, task: Task, modes: str = "all,auto", say: Any = print,
            repeat: int = 1) -> dict[str, hp.TriangulationReport]:
    """Warm up, run the report once per mode (comma-separated, in order) and print the lines of the module doc
    (with both modes, the ratio and the verdict comparison). ``repeat`` > 1: that many rounds, the order of the
    modes reversed every other round (all, auto, auto, all, ...), each round's ratio printed and then their
    median. Returns the first round's reports by mode."""
    hp.triangulate(model, task.subset(range(min(4, len(task)))), components=["L0H0", f"L{model.n_layers - 1}H0"],
                   top=1, progress=False)  # warm-up (first-call costs)
    n = len(task)
    names = modes.split(",")
    first: dict[str, hp.TriangulationReport] = {}
    ratios: list[tuple[float, float]] = []
    for k in range(repeat):
        reps, wall, cpu = {}, {}, {}
        for mode in (names if k % 2 == 0 else names[::-1]):
            reps[mode], wall[mode], cpu[mode] = run(model, task, mode)
            t = reps[mode].to_frame()
            b = reps[mode].baseline
            made = {m: int(t["measured"].map(lambda x, m=m: m in x.split(", ")).sum()) for m in MEASUREMENTS}
            say(f"shape={shape} exact={mode} wall_s={wall[mode]:.1f} cpu_s={cpu[mode]:.1f} "
                f"swept={int(t['measured'].ne('').sum())}/{len(t)} "
                + " ".join(f"{m}={v}" for m, v in made.items()) + f"  (n={n}, clean {b['clean_metric']:.3g}, "
                f"corrupted {b['corrupted_metric']:.3g}, gap {b['gap']:.3g})", flush=True)
            for step, sec in reps[mode].timings.items():
                say(f"shape={shape} exact={mode} step={step} wall_s={sec:.1f}", flush=True)
        first = first or reps
        if "all" in reps and "auto" in reps:
            ratios.append((wall["auto"] / wall["all"], cpu["auto"] / cpu["all"]))
            say(f"shape={shape} ratio auto/all wall={ratios[-1][0]:.3f} cpu={ratios[-1][1]:.3f}"
                f"{f' (round {k + 1} of {repeat})' if repeat > 1 else ''}  (issue 14: at most 1/3)")
            _verdicts(shape, reps, say)
    if len(ratios) > 1:
        w, c = (statistics.median(r[i] for r in ratios) for i in (0, 1))
        say(f"shape={shape} ratio auto/all median of {len(ratios)} rounds wall={w:.3f} cpu={c:.3f} "
            f"(wall: {' '.join(f'{r[0]:.3f}' for r in ratios)})  (issue 14: at most 1/3)")
    sys.stdout.flush()
    return first


def _verdicts(shape: str, reps: dict[str, hp.TriangulationReport], say: Any) -> None:
    """Print how the auto run's verdicts compare with the exhaustive run's (the module doc's last two lines)."""
    f = reps["all"].to_frame().set_index("component")
    x = reps["auto"].to_frame().set_index("component")
    top = list(f.index[:10])
    same = [c for c in top if f.loc[c, "verdict"] == x.loc[c, "verdict"]]
    say(f"shape={shape} top10 verdicts agree={len(same)}/{len(top)} (by the exhaustive run's importance) "
        + " ".join(f"[{c}: {f.loc[c, 'verdict']} -> {x.loc[c, 'verdict']}"
                   f"{'' if x.loc[c, 'exact'] else ' (' + (x.loc[c, 'measured'] or 'estimated') + ')'}]"
                   for c in top))
    nm = f.index[f["verdict"] != "agree: minor"]
    agree = int((x.loc[nm, "verdict"] == f.loc[nm, "verdict"]).sum())
    say(f"shape={shape} non-minor verdicts agree={agree}/{len(nm)} swept={int(x.loc[nm, 'measured'].ne('').sum())}/"
        f"{len(nm)}; all verdicts agree={int((x.loc[f.index, 'verdict'] == f['verdict']).sum())}/{len(f)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=None, help="prompt pairs (default: 32 for gpt2, 16 for the others)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--position", type=int, default=5, help="the corrupted token's position")
    ap.add_argument("--modes", default="all,auto", help="which runs, in order (comma-separated: all, auto)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the modes, the order reversed every other round; prints the median ratio")
    ap.add_argument("--every-row", action="store_true",
                    help="every stacked forward runs every row (Runner.suffix_rows = False; same numbers)")
    ap.add_argument("--no-share", action="store_true",
                    help="every analysis builds its own runner (effects.common.SHARE_RUNS = False; same numbers)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    if a.every_row:
        from hydra_probe.runner import Runner

        Runner.suffix_rows = False
    if a.no_share:
        from hydra_probe.effects import common

        common.SHARE_RUNS = False
    model, task = make(a.shape, a.prompts or SHAPES[a.shape][3], a.tokens, a.position)
    compare(a.shape, model, task, a.modes, repeat=a.repeat)


if __name__ == "__main__":
    main()
