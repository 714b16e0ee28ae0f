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

``--report-step`` instead times the report's "Why it repairs" step against
``self_repair`` on a random Llama shaped like SmolLM-135M (30 layers, 9 heads, 3 key/value
heads, d 576, MLP 1536, vocabulary 49152, tied embeddings; all 270 heads), in one run:

    shape=smollm-135m op=why_it_repairs ... self_repair_s=S standalone_s=W ratio_wall=R ratio_cpu=C
        one_sweep_s=O one_sweep_ratio_wall=... one_sweep_ratio_cpu=...

``standalone``: the step as it runs on its own (``mechanism_step``: repair_mechanisms, the
per-layer regression, the neurons of the most compensating MLP; then ``add_mechanisms`` on the
compensation graph); ``one_sweep``: what the report spends on self-repair and the step together
now that the self-repair step takes its result from ``repair_mechanisms(...).as_self_repair()``
and the step reuses that sweep (compare with self_repair + standalone, the two sweeps before).
``--layers`` changes the depth.
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
    ap.add_argument("--report-step", action="store_true", help="time the report's 'Why it repairs' step instead")
    ap.add_argument("--layers", type=int, default=30, help="depth of the --report-step model")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.report_step:
        bench_report_step(a)
        return
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


def make_smollm(layers: int, n_prompts: int, n_tokens: int, seed: int = 0):
    """A random Llama shaped like SmolLM-135M (``layers`` deep) and a random-token task."""
    import transformers as tf
    from tokenizers import Tokenizer, models

    from hydra_probe.tasks.task import Task

    torch.manual_seed(seed)
    V = 49152
    cfg = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=V, tie_word_embeddings=True, max_position_embeddings=256)
    hf = tf.LlamaForCausalLM(cfg).eval()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                     unk_token="[UNK]")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_prompts, n_tokens), generator=g)
    corr = ids.clone()
    corr[:, 3] = torch.randint(0, V, (n_prompts,), generator=g)
    ans = torch.randint(0, V, (n_prompts,), generator=g)
    task = Task([{"clean": "", "corrupted": "", "answer": "", "alternative": ""}] * n_prompts, "random", "random",
                seed, list(ids), list(corr), ans, (ans + 1) % V)
    return hp.load_model(hf, tokenizer=tok), task


def bench_report_step(a: argparse.Namespace) -> None:
    from hydra_probe.graph import add_mechanisms, compensation_graph
    from hydra_probe.report.why_it_repairs import mechanism_step

    m, task = make_smollm(a.layers, a.prompts, a.tokens)
    heads = [c.name for c in m.components("heads")]
    kw = dict(value="mean", progress=False)
    hp.self_repair(m, task, heads[:1], **kw)  # warm-up (imports, allocator, the cached prefixes)
    import statsmodels.api  # noqa: F401  (a one-time import the report pays elsewhere)

    res: dict = {}
    t = {"self_repair": timed(lambda: res.__setitem__("sr", hp.self_repair(m, task, heads, **kw)))}
    G = compensation_graph(res["sr"], top_k=5)
    top = list(res["sr"].summary().sort_values("de_lost", key=abs, ascending=False)["component"].head(5))

    def standalone() -> None:
        out, _ = mechanism_step(m, task, components=heads, top=top, **kw)
        add_mechanisms(G, out["repair_mechanisms"])

    def one_sweep() -> None:  # the report's self-repair step, then the step on the same sweep
        pre = hp.repair_mechanisms(m, task, heads, **kw)
        pre.as_self_repair()
        out, _ = mechanism_step(m, task, components=heads, top=top, mech=pre, **kw)
        add_mechanisms(G, out["repair_mechanisms"])

    t["standalone"] = timed(standalone)
    t["one_sweep"] = timed(one_sweep)
    (sw, sc), (w, c), (ow, oc) = t["self_repair"], t["standalone"], t["one_sweep"]
    sys.stdout.write(f"shape=smollm-135m layers={a.layers} op=why_it_repairs components={len(heads)} "
                     f"prompts={a.prompts} tokens={a.tokens} self_repair_s={sw:.1f} standalone_s={w:.1f} "
                     f"ratio_wall={w / sw:.2f} ratio_cpu={c / sc:.2f} one_sweep_s={ow:.1f} "
                     f"one_sweep_ratio_wall={ow / sw:.2f} one_sweep_ratio_cpu={oc / sc:.2f} "
                     f"(self_repair + standalone, two sweeps: ratio_cpu={(sc + c) / sc:.2f})\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
