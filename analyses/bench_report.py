"""Benchmark: the full triangulation report with exact="auto" against exact="all", measured in one run.

On a random-weight model (no downloads) of a real model's shape, runs
``hp.triangulate`` (every section, defaults: all heads, mean ablation, top 5,
"Why it repairs") once with ``exact="all"`` (every component swept exactly)
and once with ``exact="auto"`` (the default: AtP* and the direct effects rule
components out), on the same prompts, and prints:

    shape=NAME exact=all|auto wall_s=W cpu_s=C swept=K/N
    shape=NAME exact=all|auto step=STEP wall_s=S        (rep.timings, one line per step)
    shape=NAME ratio auto/all wall=R cpu=C
    shape=NAME top10 verdicts agree=A/10 (by the exhaustive run's importance) [component: all -> auto ...]
    shape=NAME non-minor verdicts agree=A/B swept=S/B

cpu_s is this process's CPU time (steadier than wall clock on a shared
machine). Shapes:

* ``gpt2``: GPT-2 small (12 layers x 12 heads = 144 heads, d_model 768,
  vocabulary 50257), 32 prompt pairs by default.
* ``smol``: a Llama shaped like SmolLM-135M (30 layers x 9 heads = 270 heads,
  3 key/value heads, d_model 576, MLP 1536, vocabulary 49152, tied
  embeddings), 16 prompt pairs by default.

The prompts are random tokens; the corrupted prompt changes one token (at
``--position``), and each pair's answer and alternative are the tokens whose
logits that change raises and lowers most at the last position, so the
clean - corrupted gap is the corruption's effect and not noise.
Usage:
    python analyses/bench_report.py [--shape gpt2|smol] [--prompts N] [--modes all,auto] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import transformers as tf

import hydra_probe as hp
from hydra_probe.tasks.task import Task

SHAPES = {
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=64), 32),
    "smol": (tf.LlamaConfig, tf.LlamaForCausalLM,
             dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                  intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=256),
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=None, help="prompt pairs (default: 32 for gpt2, 16 for smol)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--position", type=int, default=5, help="the corrupted token's position")
    ap.add_argument("--modes", default="all,auto", help="which runs, in order (comma-separated: all, auto)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    n = a.prompts or SHAPES[a.shape][3]
    model, task = make(a.shape, n, a.tokens, a.position)
    hp.triangulate(model, task.subset(range(4)), components=["L0H0", f"L{model.n_layers - 1}H0"], top=1,
                   progress=False)  # warm-up (first-call costs)
    say = print
    reps, wall, cpu = {}, {}, {}
    b = None
    for mode in a.modes.split(","):
        reps[mode], wall[mode], cpu[mode] = run(model, task, mode)
        t = reps[mode].to_frame()
        b = reps[mode].baseline
        say(f"shape={a.shape} exact={mode} wall_s={wall[mode]:.1f} cpu_s={cpu[mode]:.1f} "
            f"swept={int(t['exact'].sum())}/{len(t)}  (n={n}, clean {b['clean_metric']:.3g}, "
            f"corrupted {b['corrupted_metric']:.3g}, gap {b['gap']:.3g})", flush=True)
        for step, s in reps[mode].timings.items():
            say(f"shape={a.shape} exact={mode} step={step} wall_s={s:.1f}", flush=True)
    if "all" in reps and "auto" in reps:
        say(f"shape={a.shape} ratio auto/all wall={wall['auto'] / wall['all']:.3f} cpu={cpu['auto'] / cpu['all']:.3f}")
        f = reps["all"].to_frame().set_index("component")
        x = reps["auto"].to_frame().set_index("component")
        top = list(f.index[:10])
        same = [c for c in top if f.loc[c, "verdict"] == x.loc[c, "verdict"]]
        say(f"shape={a.shape} top10 verdicts agree={len(same)}/10 (by the exhaustive run's importance) "
            + " ".join(f"[{c}: {f.loc[c, 'verdict']} -> {x.loc[c, 'verdict']}"
                       f"{'' if x.loc[c, 'exact'] else ' (estimated)'}]" for c in top))
        nm = f.index[f["verdict"] != "agree: minor"]
        agree = int((x.loc[nm, "verdict"] == f.loc[nm, "verdict"]).sum())
        say(f"shape={a.shape} non-minor verdicts agree={agree}/{len(nm)} swept={int(x.loc[nm, 'exact'].sum())}/"
            f"{len(nm)}; all verdicts agree={int((x.loc[f.index, 'verdict'] == f['verdict']).sum())}/{len(f)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
