"""Write the shipped model's card (hydra_probe/zoo/default/README.md) from measurements.

Every number in the card is measured here with the package's own API on
held-out-name IOI prompts, or read from the training record
(``training.json``, written by ``python -m hydra_probe.zoo.train``). Usage:

    python analyses/model_card.py [--n-prompts 200]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import hydra_probe as hp
from hydra_probe import graph as hg
from hydra_probe.io import atomic_write_text
from hydra_probe.zoo import DEFAULT_MODEL_DIR


def measure(n_prompts: int, seed: int = 0) -> dict:
    """Accuracy, logit difference, top heads and top-head self-repair on held-out names."""
    model = hp.load_default_model()
    task = hp.tasks.ioi(model, n_prompts=n_prompts, corruption="abc", seed=seed, names="heldout")
    de = hp.direct_effects(model, task, components="all")
    ld = de.constant["metric"]
    heads = de.summary()
    heads = heads[heads.component.str.startswith("L")].sort_values("direct_effect", ascending=False)
    top = heads.component.iloc[0]
    out = {"n_prompts": n_prompts, "seed": seed, "names": "heldout", "corruption": "abc",
           "accuracy": float((ld > 0).mean()), "logit_diff_mean": float(ld.mean()),
           "logit_diff_std": float(ld.std()),
           "top_heads": [{"component": r.component, "direct_effect": float(r.direct_effect)}
                         for r in heads.head(5).itertuples()],
           "top_head": top, "ablations": {}}
    for value in ("mean", "zero"):
        sr = hp.self_repair(model, task, [top], value=value, scale="frozen")
        s = sr.summary().iloc[0]
        con = sr.contributions().groupby("downstream").delta_de.mean().sort_values(ascending=False)
        kind = np.where(con.index == "NORM", "norm", np.where(con.index.str.startswith("MLP"), "mlps", "heads"))
        split = con.groupby(kind).sum()
        out["ablations"][value] = {
            "de_lost": float(s.de_lost), "total_effect": float(s.total_effect), "self_repair": float(s.self_repair),
            "self_repair_ci": [float(s.self_repair_lo), float(s.self_repair_hi)],
            "te_over_del": float(s.total_effect / s.de_lost), "norm_term": float(s.norm_term),
            "compensators": [{"component": k, "delta_de": float(v)} for k, v in con.head(4).items() if v > 0],
            "split": {k: float(split.get(k, 0.0)) for k in ("heads", "mlps", "norm")},
        }
    # who compensates whom among the top heads, checked by paired ablation (zero ablation: what head
    # dropout trained the model to survive)
    sr = hp.self_repair(model, task, heads.component.head(4).tolist(), value="zero", scale="frozen")
    G = hg.compensation_graph(sr)
    ver = hg.verify_edges(model, task, G, top=6)
    out["paired_verification"] = {
        "value": "zero", "heads": heads.component.head(4).tolist(),
        "edges": [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()}
                  for r in ver.tested[["source", "target", "weight", "interaction", "interaction_lo",
                                       "interaction_hi", "interaction_edge", "interaction_others",
                                       "interaction_norm", "verified"]].to_dict("records")]}
    # the strongest amplification edges (d's DE falls when c is ablated), split the same way
    neg = sorted(((u, v, d["weight"]) for u, v, d in G.edges(data=True) if v != "NORM" and d["weight"] < 0),
                 key=lambda e: e[2])[:3]
    if neg:
        s = hp.interaction_parts(model, task, [(u, v) for u, v, _ in neg], value="zero").summary()
        out["amplification"] = [{"source": r["first"], "target": r["second"], "weight": float(w),
                                 **{k: float(r[k]) for k in ("interaction", "interaction_lo", "interaction_hi",
                                                             "edge", "others", "norm")}}
                                for (_, _, w), (_, r) in zip(neg, s.iterrows())]
    return out


LESSONS = (
    "What worked and what did not (details per attempt below). Filler text that never required copying a "
    "name left held-out names at chance (train accuracy 1.0, held-out ~0.55); copy-style filler fixed that. "
    "With full-width MLPs (4 x d_model) the IOI answer was written mostly by MLPs and heads' direct effects "
    "were tiny, so ablating a head showed no compensation (TE / DEL far above 1). Narrow MLPs (1 x d_model) "
    "alone were not enough, nor were MLPs of a quarter width. What worked: head dropout (0.2, on half the "
    "sequences) together with dropping whole MLP outputs at random (MLP dropout 0.6), which pushes the answer "
    "into several heads that learn to stand in for each other. Three independent runs of that recipe (seed 0 "
    "on 1 and on 2 threads, seed 1) all met the bars; label smoothing of the IO target (d2) broke accuracy."
)


def render(m: dict, training: dict) -> str:
    r = training.get("recipe", {})
    lines = [
        "# hydra_probe default model: a small IOI transformer with backup heads",
        "",
        "A GPT-2-architecture model (`GPT2LMHeadModel`, word-level tokenizer) trained by "
        "`python -m hydra_probe.zoo.train` on a synthetic corpus of indirect-object sentences and filler text, "
        "with head dropout so that backup heads take over when a head is removed. A model organism of "
        "self-repair. This card is written by `analyses/model_card.py`; do not edit it by hand.",
        "",
        "## Architecture and recipe",
        "",
        f"- layers {r.get('n_layer')}, heads {r.get('n_head')}, d_model {r.get('d_model')}, "
        f"context {r.get('n_positions')}, MLP width {r.get('mlp_ratio')} x d_model",
        f"- steps {r.get('steps')}, batch {r.get('batch_size')}, lr {r.get('lr')}, head dropout "
        f"{r.get('head_dropout')} (on a {r.get('head_dropout_seq_frac')} share of sequences), MLP dropout "
        f"{r.get('mlp_dropout')} (whole MLP outputs, per sequence and layer), IOI share {r.get('ioi_frac')}, "
        f"seed {r.get('seed')}, threads {r.get('threads')}",
        f"- training time: {training.get('train_time_s', '?')} s of wall clock "
        f"on this recipe's threads (command: `{training.get('command', '')}`)",
        *([f"- reproduction ({training['reproduction'].get('date')}): {training['reproduction'].get('result')}, "
           f"{training['reproduction'].get('train_time_s')} s on 2 CPU cores"] if training.get("reproduction") else []),
        "",
        f"## Held-out IOI ({m['n_prompts']} prompts, names never seen in IOI sentences, "
        f"corruption '{m['corruption']}', seed {m['seed']})",
        "",
        f"- accuracy (logit of IO > logit of S): **{m['accuracy']:.3f}**",
        f"- logit difference IO - S: mean **{m['logit_diff_mean']:.2f}** (sd {m['logit_diff_std']:.2f})",
        "",
        "Heads with the largest mean direct effect (frozen clean scale):",
        "",
        "| head | direct effect |",
        "|---|---|",
    ]
    lines += [f"| {h['component']} | {h['direct_effect']:.3f} |" for h in m["top_heads"]]
    lines += ["", f"## Self-repair when the top head ({m['top_head']}) is ablated", "",
              "| value | DE lost | total effect | TE / DEL | self-repair (95% CI) | final-norm part "
              "| compensators (delta DE) |",
              "|---|---|---|---|---|---|---|"]
    for v, a in m["ablations"].items():
        comp = ", ".join(f"{c['component']} (+{c['delta_de']:.2f})" for c in a["compensators"]) or "none"
        lines.append(f"| {v} | {a['de_lost']:.3f} | {a['total_effect']:.3f} | {a['te_over_del']:.2f} | "
                     f"{a['self_repair']:.3f} [{a['self_repair_ci'][0]:.3f}, {a['self_repair_ci'][1]:.3f}] | "
                     f"{a['norm_term']:.3f} | {comp} |")
    lines += ["", "Self-repair split (mean over prompts, frozen clean scale; the rows sum to the self-repair): "
              + "; ".join(
        f"{v}: downstream heads {a['split']['heads']:+.3f}, MLPs {a['split']['mlps']:+.3f}, final norm "
        f"{a['split']['norm']:+.3f}" for v, a in m["ablations"].items()) + ". Positive parts restore the metric, "
        "negative ones (components that amplified the ablated head's signal) deepen the loss; the paired ablations "
        "below test whether heads stand in for each other."]
    pv = m.get("paired_verification")
    if pv:
        lines += ["", f"## Compensation among the top heads, verified by paired ablation ({pv['value']} ablation)", "",
                  f"Edges c -> d of the compensation graph of {', '.join(pv['heads'])}: d's direct effect rises by "
                  "`weight` when c is ablated; `interaction` = TE(c, d) - TE(c) - TE(d) with its 95% t interval; "
                  "confirmed when both are positive.", "",
                  "The interaction splits exactly into the edge itself (d's rise when c is ablated), the other "
                  "components' non-additive reactions and the final norm's (`hp.interaction_parts`).", "",
                  "| edge | weight | interaction (95% CI) | I: edge | I: others | I: norm | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['source']} -> {e['target']} | {e['weight']:.3f} | {e['interaction']:.3f} "
                  f"[{e['interaction_lo']:.3f}, {e['interaction_hi']:.3f}] | {e['interaction_edge']:.3f} | "
                  f"{e['interaction_others']:.3f} | {e['interaction_norm']:.3f} | {e['verified']} |"
                  for e in pv["edges"]]
    amp = m.get("amplification")
    if amp:
        lines += ["", "The strongest amplification edges (d's direct effect falls when c is ablated), split the same "
                  "way. To first order their interaction has the edge's (negative) sign; where the final norm's "
                  "part outweighs the edge, the paired ablation shows the opposite sign, which is why only "
                  "compensation edges are verified by paired ablation.", "",
                  "| edge | weight | interaction (95% CI) | I: edge | I: others | I: norm |", "|---|---|---|---|---|---|"]
        lines += [f"| {e['source']} -> {e['target']} | {e['weight']:.3f} | {e['interaction']:.3f} "
                  f"[{e['interaction_lo']:.3f}, {e['interaction_hi']:.3f}] | {e['edge']:.3f} | {e['others']:.3f} | "
                  f"{e['norm']:.3f} |" for e in amp]
    att = training.get("attempts", [])
    if att:
        lines += ["", "## What was tried", "", LESSONS, "",
                  "Each training attempt, from the training record (held-out numbers from the training script's own "
                  "check: top head by DE, then mean ablation of it):", "",
                  "| attempt | steps | MLP ratio | head dropout (seq. share) | MLP dropout | seed / threads "
                  "| accuracy | logit diff | top head | TE / DEL | heads whose DE rises | bars met | train time (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in att:
            r = a.get("recipe", {})

            def f(x, fmt="{:.2f}"):
                return "-" if x is None else fmt.format(x)

            lines.append(
                f"| {a.get('note', '')} | {r.get('steps')} | {r.get('mlp_ratio') or 4} | {r.get('head_dropout')} "
                f"({r.get('head_dropout_seq_frac')}) | {r.get('mlp_dropout') or 0} | {r.get('seed')} / "
                f"{r.get('threads')} | {f(a.get('accuracy'), '{:.3f}')} | {f(a.get('mean_logit_diff'))} | "
                f"{a.get('top_head')} | {f(a.get('TE_over_DEL'))} | "
                f"{', '.join(a.get('compensating_heads') or []) or '-'} "
                f"| {'yes' if a.get('accepted') else 'no'} | {a.get('train_time_s')} |")
    lines += ["", "Files: `config.json`, `model.safetensors`, `tokenizer.json` (standard transformers layout; "
              "`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` open them), "
              "`training.json` (full recipe and record), `card.json` (the numbers above).", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-prompts", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    training = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())
    m = measure(args.n_prompts)
    atomic_write_text(DEFAULT_MODEL_DIR / "card.json", json.dumps(m, indent=1) + "\n")
    atomic_write_text(DEFAULT_MODEL_DIR / "README.md", render(m, training))
    print(render(m, training))


if __name__ == "__main__":
    main()
