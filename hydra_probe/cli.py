"""The ``hydra-probe`` command line: ``report``, ``ablate``, ``graph``, ``conditions`` and ``text``.

Exit codes: 0 on success; 2 on bad input (unknown flag or value, missing
file, non-empty output folder without ``--overwrite``, unknown component,
a model that produces NaN, ...: every ``InputError`` and ``NumericalError``)
with a one-line message on stderr and no traceback; 1 on anything else
(``--debug`` shows the traceback). Every input is checked before the first
forward pass, and a refused or failed run leaves no output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

PROG = "hydra-probe"
DEFAULT_N_PROMPTS = 32
DEFAULT_OUT = {"report": "hydra_report/", "graph": "hydra_graph/", "ablate": None, "conditions": "hydra_conditions/",
               "text": "hydra_text/"}
# generated tasks besides ioi, with their fixed corruption
TASKS = {"ioi": "IOI's corruption is --corruption swap|abc",
         "pronoun": "the pronoun task swaps the name for one of the other gender",
         "greater_than": "greater-than sets the start year to XX01",
         "induction": "induction replaces the repeated half by fresh random tokens"}

THRESHOLD_HELP = ("verdict threshold: a share of the verdict scale (the clean metric) for total effect and DE lost, "
                  "of the clean-corrupted gap for restoration and damage (default: 0.1)")

_EPILOG = """\
exit codes: 0 success; 2 bad input (one-line message, no traceback); 1 any other error.
examples:
  hydra-probe report                                  # shipped model, IOI, writes hydra_report/
  hydra-probe report --model path/to/model --task pairs.jsonl --out my_report --overwrite
  hydra-probe report --exact all                      # every measurement of every component (default: each one
                                                      # only where its AtP* estimate can't rule it out)
  hydra-probe ablate --components L2H3,L3H0+L3H1      # single and set (joint) ablations
  hydra-probe ablate --pair L2H3 L3H1 --pair L2H3 L3H0  # paired ablations and interactions
  hydra-probe graph --top-k 3 --verify 5 --out hydra_graph/
  hydra-probe conditions --conditions all             # every verdict across corruptions, ablation values, metrics
  hydra-probe report --conditions abc,zero,logprob    # the report plus its 'another counterfactual' section
  hydra-probe ablate --task pronoun                   # also greater_than, induction, or a JSONL file
  hydra-probe text --texts corpus.txt --top-fraction 0.02 --out hydra_text/
"""


class UsageError(Exception):
    """A command-line mistake found by argparse (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become one line (no usage dump) and exit code 2 via :func:`main`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# ============================================================================ parser
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .interventions import ABLATION_VALUES
    from .metrics import METRICS
    from .tasks import CORRUPTIONS

    common = _Parser(add_help=False)
    g = common.add_argument_group("model and task")
    g.add_argument("--model", default="default", metavar="MODEL",
                   help="'default' (the shipped IOI model, offline), a local folder with safetensors weights and a "
                        "tokenizer, a .gguf file (needs the gguf extra), or a Hugging Face hub name already in the "
                        "local cache (default: default)")
    g.add_argument("--task", default="ioi", metavar="TASK",
                   help="'ioi', 'pronoun' (gendered pronoun), 'greater_than' (Hanna et al. years; measured with its "
                        "linear proxy, the mean logit of the later years minus that of the others), 'induction' "
                        "(repeated random tokens), or a JSONL file of {clean, corrupted, answer, alternative} rows "
                        "(default: ioi)")
    g.add_argument("--n-prompts", type=_positive_int, default=DEFAULT_N_PROMPTS, metavar="N",
                   help=f"number of generated prompt pairs (default: {DEFAULT_N_PROMPTS}; ignored for a JSONL task)")
    g.add_argument("--corruption", choices=sorted(CORRUPTIONS), default=None,
                   help="IOI corruption: 'swap' (the repeated name becomes the indirect object, the answer flips) or "
                        "'abc' (a third name; nothing repeats). Default: swap. Only for --task ioi")
    g.add_argument("--seed", type=int, default=0, help="seed of the IOI prompts and of resample donors (default: 0)")
    g = common.add_argument_group("measurement")
    g.add_argument("--value", choices=ABLATION_VALUES, default="mean",
                   help="ablation value: zero, mean (per-position mean over the clean prompts) or resample "
                        "(another prompt's activation, seeded). Default: mean")
    g.add_argument("--metric", choices=sorted(METRICS), default="logit_diff",
                   help="metric at the last position (default: logit_diff = logit(answer) - logit(alternative)); "
                        "report and graph need a linear one (logit_diff or logit)")
    g.add_argument("--components", default="heads", metavar="SEL",
                   help="'heads', 'mlps', 'layers' (whole attention layers), 'all' (heads and MLPs), or a comma-"
                        "separated list of names such as L2H3,MLP1; 'A+B' ablates A and B together (default: heads)")
    g.add_argument("--scale", choices=("frozen", "recomputed"), default="frozen",
                   help="final-norm scale policy for direct effects: frozen (the clean run's) or recomputed (each "
                        "run's own). Default: frozen")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: where the model is)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                   help="weights' dtype for a hub name or folder: float32 (default; exact decompositions), "
                        "bfloat16, float16, or auto (the checkpoint's own)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for small models, d_model < 512, whose many tiny "
                        "operations run faster on one thread; torch's own default otherwise)")
    g = common.add_argument_group("output")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    g.add_argument("--quiet", action="store_true", help="no progress messages")
    g.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")

    p = _Parser(prog=PROG, description="Self-repair and Hydra-effect analysis of transformer language models: "
                                       "ablations as lower bounds, beside activation, path and attribution patching.",
                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{report,ablate,graph,conditions,text}", parser_class=_Parser)

    r = sub.add_parser("report", parents=[common], help="write the full triangulation report (md, html, json, csv, "
                                                        "figures, graph)",
                       description="Run every analysis (direct effects, ablation and self-repair, activation "
                                   "patching both ways, attribution patching, the compensation graph with paired "
                                   "confirmations, iterated ablation, path patching) and write the report folder.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--out", default=DEFAULT_OUT["report"], metavar="FOLDER",
                   help="report folder (default: hydra_report/); refused if non-empty unless --overwrite")
    r.add_argument("--top", type=_positive_int, default=5, metavar="K",
                   help="components that get path patching, paired confirmations and figures (default: 5)")
    r.add_argument("--threshold", type=_fraction, default=0.1, metavar="T",
                   help=THRESHOLD_HELP)
    r.add_argument("--exact", choices=("auto", "all"), default="auto",
                   help="each exact measurement (activation patching denoise and noise; the ablation with "
                        "self-repair) only where its own AtP* estimate (for the ablation, with the direct effect) "
                        "cannot rule it out ('auto', default; the table's exact column says which were made and the "
                        "bound is printed) or every measurement of every component ('all', the exhaustive run)")
    r.add_argument("--no-figures", action="store_true",
                   help="skip the figures (faster); report.md/html then have tables only")
    r.add_argument("--conditions", default=None, metavar="all|LIST",
                   help="add the section 'Does the claim survive another counterfactual?': 'all' (every corruption "
                        "the task can make x zero, mean, resample x logit_diff, logprob) or a comma-separated list "
                        "of corruptions, ablation values and metrics added to the report's own (default: none)")

    a = sub.add_parser("ablate", parents=[common], help="single, set or paired ablations; a table on the terminal",
                       description="Ablate components one at a time (or jointly with A+B) and print total effect, "
                                   "direct effect lost and self-repair; with --pair, ablate pairs and print the "
                                   "interaction TE(c,d) - TE(c) - TE(d).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--pair", nargs=2, action="append", metavar=("C", "D"),
                   help="a pair to ablate singly and together (repeatable); replaces --components")
    a.add_argument("--rows", type=_positive_int, default=20, metavar="N",
                   help="rows printed, largest total effect first (default: 20)")
    a.add_argument("--out", default=None, metavar="FOLDER",
                   help="also save the result (JSON and CSV) into this folder (default: terminal only)")

    gr = sub.add_parser("graph", parents=[common], help="compensation graph: exports (GraphML, GEXF, JSON, CSV) and "
                                                        "a drawing",
                        description="Measure self-repair, build the compensation graph (edge c -> d: change of d's "
                                    "direct effect when c is ablated), confirm the strongest edges with paired "
                                    "ablations, and write exports and a drawing.",
                        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    gr.add_argument("--out", default=DEFAULT_OUT["graph"], metavar="FOLDER",
                    help="output folder (default: hydra_graph/); refused if non-empty unless --overwrite")
    gr.add_argument("--threshold", type=_nonneg_float, default=0.0, metavar="W",
                    help="keep edges with |weight| above W, in metric units (default: 0)")
    gr.add_argument("--top-k", type=_positive_int, default=5, metavar="K",
                    help="keep at most K strongest edges per ablated component (default: 5)")
    gr.add_argument("--verify", type=_nonneg_int, default=5, metavar="N",
                    help="confirm the N strongest compensation edges with paired ablations; 0 skips (default: 5)")
    c = sub.add_parser("conditions", parents=[common], help="every verdict across corruptions, ablation values and "
                                                            "metrics (tables, figure, md/html)",
                       description="Measure every component's evidence (total effect, DE lost and self-repair where "
                                   "the metric is linear, restoration, damage) and verdict under every condition "
                                   "(corruption x ablation value x metric); say which factor changes a verdict. The "
                                   "reference condition is --corruption, --value and --metric.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--conditions", default="all", metavar="all|LIST",
                   help="'all' (every corruption the task can make x zero, mean, resample x logit_diff, logprob; "
                        "default) or a comma-separated list of corruptions, values and metrics added to the "
                        "reference ones")
    c.add_argument("--out", default=DEFAULT_OUT["conditions"], metavar="FOLDER",
                   help="output folder (default: hydra_conditions/); refused if non-empty unless --overwrite")
    c.add_argument("--top", type=_positive_int, default=10, metavar="K",
                   help="components in the figure, the printed table and the sentences (default: 10)")
    c.add_argument("--threshold", type=_fraction, default=0.1, metavar="T",
                   help=THRESHOLD_HELP)
    c.add_argument("--no-figures", action="store_true", help="skip the figure")
    _add_text_parser(sub)
    return p


def _add_text_parser(sub: Any) -> None:
    """``hydra-probe text``: self-repair at every position of natural text (its own options; no task)."""
    from .interventions import ABLATION_VALUES

    t = sub.add_parser("text", help="self-repair on natural text, every position a measurement (Rushing & Nanda)",
                       description="Ablate each component over whole texts and measure, at every position p, the "
                                   "direct effect, DE lost, total effect and self-repair on the logit of the actual "
                                   "token at p+1; summarise each component on its top fraction of positions by "
                                   "direct effect. Writes positions.csv, summary.csv, summary.md and the result JSON.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--texts", required=True, metavar="FILE",
                   help="UTF-8 file with one text a line, or JSONL objects with a 'text' field")
    t.add_argument("--model", default="default", metavar="MODEL",
                   help="'default' (the shipped model), a local folder, or a cached hub name (default: default)")
    t.add_argument("--components", default="heads", metavar="SEL",
                   help="'heads', 'mlps', 'layers', 'all', or names such as L2H3,MLP1; 'A+B' ablates together "
                        "(default: heads)")
    t.add_argument("--value", choices=ABLATION_VALUES, default="resample",
                   help="ablation value: resample (default; a donor text at least as long, same position, seeded), "
                        "mean (per position over the texts) or zero")
    t.add_argument("--top-fraction", type=_top_fraction, default=0.02, metavar="F",
                   help="fraction of positions, by clean direct effect per component, that the summary keeps, in "
                        "(0, 1] (default: 0.02, Rushing & Nanda's top 2%%)")
    t.add_argument("--window", type=_positive_int, default=None, metavar="N",
                   help="split texts into windows of at most N tokens (default: refuse texts longer than the "
                        "model's context)")
    t.add_argument("--scale", choices=("frozen", "recomputed"), default="frozen",
                   help="final-norm scale policy for the norm term (default: frozen)")
    t.add_argument("--seed", type=int, default=0, help="seed of resample donors and the bootstrap (default: 0)")
    t.add_argument("--device", default=None, help="torch device (default: where the model is)")
    t.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "auto"), default="float32",
                   help="weights' dtype for a hub name or folder (default: float32)")
    t.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="CPU threads for torch")
    t.add_argument("--out", default=DEFAULT_OUT["text"], metavar="FOLDER",
                   help="output folder (default: hydra_text/); refused if non-empty unless --overwrite")
    t.add_argument("--rows", type=_positive_int, default=15, metavar="N",
                   help="components printed, most self-repair first (default: 15)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    t.add_argument("--quiet", action="store_true", help="no progress messages")
    t.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    # check_args reads these; text mode has no task, corruption or metric of its own choosing
    t.set_defaults(task="ioi", corruption=None, metric="logit_diff", n_prompts=None)


def _top_fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


# ============================================================================ checks (before any work)
def _err(msg: str) -> None:
    sys.stderr.write(f"{PROG}: error: {' '.join(str(msg).split())}\n")


def _say(args: Any, msg: str) -> None:
    """A progress line on stderr, on a terminal only (pipes and logs get the result lines alone)."""
    if not args.quiet and sys.stderr.isatty():
        sys.stderr.write(f"{PROG}: {msg}\n")
        sys.stderr.flush()


def check_args(args: Any) -> None:
    """Every check that needs no model: raises InputError subclasses."""
    from .errors import OptionError, TaskError
    from .metrics import METRICS
    from .models import resolve_device

    if args.out is not None:
        from .io import check_output_folder, check_output_location

        check_output_location(args.out, args.overwrite)

        check_output_folder(args.out, args.overwrite)
    resolve_device(args.device)
    if args.task != "ioi":
        p = Path(args.task)
        if args.task not in TASKS and not p.is_file():
            raise TaskError(f"--task {args.task!r} is neither a task name ({', '.join(TASKS)}) nor an existing JSONL "
                            "file; give one of those names or the path of a file of {clean, corrupted, answer, "
                            "alternative} rows.")
        if args.corruption is not None:
            what = TASKS.get(args.task, "a JSONL task carries its own corrupted prompts")
            raise OptionError(f"--corruption applies to --task ioi only; {what}.")
        if args.task == "greater_than" and args.metric != "logit_diff":
            raise OptionError("--task greater_than is measured with its own metric (greater_than_logit: the mean logit "
                              "of the years after the start year minus that of the others, a linear proxy of Hanna et "
                              "al.'s probability difference); leave --metric out.")
    if args.command in ("report", "graph") and not METRICS[args.metric].linear:
        raise OptionError(f"'{args.command}' needs a metric linear in the logits (direct effects and self-repair "
                          f"are defined for it); --metric {args.metric} is not. Use --metric logit_diff or logit.")
    if args.model != "default":
        p = Path(args.model).expanduser()
        gguf = args.model.lower().endswith(".gguf")
        if gguf and not p.is_file():
            raise OptionError(f"--model {args.model!r}: no such GGUF file; give the path of a .gguf file.")
        if p.exists() and not p.is_dir() and not gguf:
            raise OptionError(f"--model {args.model!r} is a file; give 'default' or a folder written by "
                              "save_pretrained (safetensors weights and a tokenizer).")
        if not p.exists() and args.model.startswith((".", "/", "~")):
            raise OptionError(f"--model {args.model!r}: no such folder; give 'default' or a folder written by "
                              "save_pretrained (safetensors weights and a tokenizer).")
    else:
        from .zoo import DEFAULT_MODEL_DIR

        if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
            from .errors import InputError

            raise InputError(f"the shipped model is missing from {DEFAULT_MODEL_DIR}; reinstall hydra_probe or "
                             "pass --model with a local model folder.")


def _components(text: str) -> Any:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        from .errors import ComponentError

        raise ComponentError("--components is empty; give a selector (heads, mlps, layers, all) or names like L2H3.")
    return items[0] if len(items) == 1 and items[0] in ("heads", "mlps", "layers", "all") else items


def _quiet_transformers() -> None:
    """No weight-loading progress bars or advisory logs from transformers in the command line's output."""
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _set_threads(args: Any, model: Any) -> None:
    """The command line is an application: it may set torch's thread count (the library never does)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif model.d_model < 512 and model.device.type == "cpu":
        torch.set_num_threads(1)


def _load_model(args: Any) -> Any:
    """The ``--model`` (quietly), with the thread count of ``--threads``."""
    import warnings

    from .models import load_model

    _say(args, f"loading model {args.model} ...")
    _quiet_transformers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(args.model if args.model == "default" else str(Path(args.model).expanduser()),
                           device=args.device, dtype=args.dtype)
    _set_threads(args, model)
    return model


def load_inputs(args: Any) -> tuple[Any, Any, Any]:
    """Model, task and components (validated against the model), still before any analysis."""

    from .components import select_groups
    from .tasks import from_jsonl, greater_than, induction, ioi, pronoun

    model = _load_model(args)
    if args.task == "ioi":
        task = ioi(model, args.n_prompts, corruption=args.corruption or "swap", seed=args.seed)
    elif args.task == "pronoun":
        task = pronoun(model, args.n_prompts, seed=args.seed)
    elif args.task == "greater_than":
        task = greater_than(model, args.n_prompts, seed=args.seed)
        args.metric = task.meta["metric"]  # its linear proxy (a Metric object; check_args refused any other)
    elif args.task == "induction":
        task = induction(model, args.n_prompts, seed=args.seed)
    else:
        task = from_jsonl(model, args.task)
    comps = _components(args.components)
    if args.command != "ablate" or not args.pair:
        select_groups(model, comps)  # unknown names fail here
    return model, task, comps


# ============================================================================ commands
def cmd_report(args: Any) -> int:
    from .report import triangulate

    model, task, comps = load_inputs(args)
    t0 = time.perf_counter()
    _say(args, f"triangulating {task.name} (n={len(task)}, corruption {task.corruption}) on {model.name} ...")
    spec = _condition_lists(args, task) if args.conditions else None
    rep = triangulate(model, task, value=args.value, scale=args.scale, metric=args.metric, components=comps,
                      top=args.top, seed=args.seed, threshold=args.threshold, progress=False if args.quiet else None,
                      exact=args.exact)
    if spec is not None:
        from .claims.conditions import compare_conditions

        _say(args, "comparing conditions: " + "; ".join(f"{k} {', '.join(v)}" for k, v in spec.items()) + " ...")
        t1 = time.perf_counter()
        t = rep.to_frame()  # the paired and iterated ablations' backups, measured under the report's value/metric
        backups = t[["component", "confirmed_backups", "iterated_cost", "iterated_backups"]].assign(
            value=args.value, metric=args.metric)
        rep.results["conditions"] = compare_conditions(model, task, comps, seed=args.seed, scale=args.scale,
                                                       threshold=args.threshold, backups=backups,
                                                       progress=False if args.quiet else None, **spec)
        rep.timings["conditions"] = time.perf_counter() - t1
        rep.config["conditions"] = args.conditions
    _say(args, f"writing {args.out} ...")
    out = rep.save(args.out, overwrite=args.overwrite, figures=not args.no_figures)
    print(rep.summary())
    print(f"report written to {out}/ (report.html, report.md, results.json) in {time.perf_counter() - t0:.1f} s")
    return 0


def _conditions(res: Any) -> str:
    p = res.provenance
    return (f"model {p.get('model')} | task {p.get('task')} (corruption {p.get('corruption')}, n={p.get('n')}) | "
            f"ablation {p.get('value')} | metric {p.get('metric')}"
            + (f" | scale {p.get('scale')}" if p.get("scale") else ""))


def text_table(frame: Any) -> str:
    """A plain fixed-width table."""
    cols = [str(c) for c in frame.columns]
    rows = [[str(v) for v in r] for r in frame.itertuples(index=False)]
    w = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w[i]) if i else v.ljust(w[i]) for i, v in enumerate(vals))  # noqa: E731
    return "\n".join([line(cols), "  ".join("-" * x for x in w)] + [line(r) for r in rows])


def cmd_ablate(args: Any) -> int:
    import pandas as pd

    from .effects import ablate, paired_ablation, self_repair
    from .formatting import ci, fmt, pct
    from .metrics import get_metric

    model, task, comps = load_inputs(args)
    progress = False if args.quiet else None
    if args.pair:
        res = paired_ablation(model, task, [tuple(p) for p in args.pair], value=args.value, metric=args.metric,
                              seed=args.seed, progress=progress)
        s = res.summary()
        tab = pd.DataFrame({"first": s["first"], "second": s["second"], "TE first": [fmt(x) for x in s["te_first"]],
                            "TE second": [fmt(x) for x in s["te_second"]], "TE both": [fmt(x) for x in s["te_both"]],
                            "interaction [95% CI]": [ci(m, lo, hi) for m, lo, hi in
                                                     zip(s["interaction"], s["interaction_lo"], s["interaction_hi"])],
                            "p (I > 0)": [fmt(x) for x in s["p_positive"]]})
        note = ("interaction = TE(both) - TE(first) - TE(second); > 0: ablating both costs more than the sum, e.g. "
                "the second compensates for the first")
    elif get_metric(args.metric).linear:
        res = self_repair(model, task, comps, value=args.value, scale=args.scale, metric=args.metric, seed=args.seed,
                          progress=progress)
        s = res.summary().sort_values("total_effect", ascending=False, kind="stable").head(args.rows)
        tab = pd.DataFrame({"component": s["component"],
                            "TE [95% CI]": [ci(m, lo, hi) for m, lo, hi in
                                            zip(s["total_effect"], s["total_effect_lo"], s["total_effect_hi"])],
                            "DE lost": [fmt(x) for x in s["de_lost"]],
                            "self-repair [95% CI]": [ci(m, lo, hi) for m, lo, hi in
                                                     zip(s["self_repair"], s["self_repair_lo"], s["self_repair_hi"])],
                            "SR/DE lost": [pct(x) for x in s["fraction_repaired"]],
                            "TE is a lower bound": ["yes" if x else "" for x in s["lower_bound"]]})
        note = ("TE = metric(clean) - metric(ablated); self-repair = DE lost - TE; 'lower bound': self-repair > 0 "
                "beyond its 95% interval, so the single ablation understates the component's role")
    else:
        res = ablate(model, task, comps, value=args.value, metric=args.metric, seed=args.seed, progress=progress)
        s = res.summary().sort_values("total_effect", ascending=False, kind="stable").head(args.rows)
        tab = pd.DataFrame({"component": s["component"],
                            "TE [95% CI]": [ci(m, lo, hi) for m, lo, hi in
                                            zip(s["total_effect"], s["total_effect_lo"], s["total_effect_hi"])]})
        note = f"TE = metric(clean) - metric(ablated); self-repair needs a linear metric ({args.metric} is not)"
    print(_conditions(res))
    print(text_table(tab))
    print(note)
    if args.out is not None:
        from .io import atomic_folder

        with atomic_folder(Path(args.out), overwrite=Path(args.out).exists()) as tmp:
            res.save(tmp / f"{res.kind}.json")
            res.to_frame().to_csv(tmp / f"{res.kind}.csv", index=False)
            res.summary().to_csv(tmp / f"{res.kind}_summary.csv", index=False)
        print(f"saved to {args.out}")
    return 0


def cmd_graph(args: Any) -> int:
    from .effects import self_repair
    from .graph import compensation_graph, draw_graph, edge_frame, node_frame, save_graph, verify_edges
    from .io import atomic_folder
    from .report.figures import save_figure

    model, task, comps = load_inputs(args)
    progress = False if args.quiet else None
    _say(args, "measuring self-repair ...")
    sr = self_repair(model, task, comps, value=args.value, scale=args.scale, metric=args.metric, seed=args.seed,
                     progress=progress)
    G = compensation_graph(sr, threshold=args.threshold, top_k=args.top_k)
    paired = None
    if args.verify:
        _say(args, f"confirming the {args.verify} strongest edges with paired ablations ...")
        ver = verify_edges(model, task, G, top=args.verify, value=args.value, metric=args.metric, progress=progress)
        G, paired = ver.graph, ver.paired
    out = Path(args.out)
    with atomic_folder(out, overwrite=out.exists()) as tmp:
        save_graph(G, tmp)
        edge_frame(G).to_csv(tmp / "edges.csv", index=False)
        node_frame(G).to_csv(tmp / "nodes.csv", index=False)
        sr.save(tmp / "self_repair.json")
        if paired is not None:
            paired.save(tmp / "paired_ablation.json")
        save_figure(draw_graph(G), tmp, "compensation_graph")
    e = edge_frame(G)
    print(_conditions(sr))
    if len(e):
        e = e.reindex(e["weight"].abs().sort_values(ascending=False, kind="stable").index).head(20)
        from .formatting import fmt

        print(text_table(e.assign(weight=[fmt(x) for x in e["weight"]],
                                  fraction=[fmt(x) for x in e.get("fraction", [float("nan")] * len(e))],
                                  q=[fmt(x) for x in e["q"]])[["source", "target", "weight", "fraction", "q", "sign",
                                                                "verified"]]))
    else:
        print("no edge passes the threshold")
    print(f"{G.number_of_nodes()} nodes, {G.number_of_edges()} edges; written to {out}/ "
          "(compensation_graph.graphml, .gexf, .json, edges.csv, nodes.csv, compensation_graph.png, .svg)")
    return 0


def _condition_lists(args: Any, task: Any) -> dict[str, list[str]]:
    """``--conditions`` as the lists of compare_conditions, checked against the task (before any forward)."""
    from .claims.conditions import check_corruptions
    from .report.conditions_section import parse_conditions

    spec = parse_conditions(args.conditions, task, args.value, args.metric)
    check_corruptions({task.name: task}, spec["corruptions"])
    return spec


def cmd_conditions(args: Any) -> int:
    from .claims.conditions import compare_conditions
    from .io import atomic_folder
    from .report import render
    from .report.blocks import Doc
    from .report.conditions_section import conditions_blocks, conditions_grid, conditions_tables
    from .report.figures import save_figure

    model, task, comps = load_inputs(args)
    spec = _condition_lists(args, task)
    t0 = time.perf_counter()
    _say(args, "comparing conditions: " + "; ".join(f"{k} {', '.join(v)}" for k, v in spec.items()) + " ...")
    cmp = compare_conditions(model, task, comps, seed=args.seed, scale=args.scale, threshold=args.threshold,
                             progress=False if args.quiet else None, **spec)
    top = cmp.top_components(args.top)
    out = Path(args.out)
    with atomic_folder(out, overwrite=out.exists()) as tmp:
        cmp.save(tmp / "conditions.json")
        for name, f in conditions_tables(cmp).items():
            f.to_csv(tmp / f"{name}.csv", index=False)
        figs = {}
        if not args.no_figures:
            figs["conditions_grid"] = save_figure(conditions_grid(cmp, top), tmp / "figures", "conditions_grid")["png"]
        doc = Doc()
        doc.h(1, f"Conditions: {model.name} on {task.name} (n={len(task)})")
        conditions_blocks(doc, cmp, top, figs)
        (tmp / "conditions.md").write_text(render.to_markdown(doc), encoding="utf-8")
        (tmp / "conditions.html").write_text(render.to_html(doc, figs, f"hydra_probe conditions: {model.name}"),
                                             encoding="utf-8")
    s = cmp.summary().set_index("component").loc[top].reset_index()
    print(f"model {model.name} | task {task.name} (n={len(task)}) | reference: "
          + ", ".join(f"{k} {v}" for k, v in cmp.reference.items() if k != "family"))
    print(text_table(s.assign(holds=[f"{h}/{n}" for h, n in zip(s["holds"], s["n_conditions"])])
                     [["component", "verdict", "holds", "factors"]]))
    print("\n".join(cmp.sentences(top)))
    print(f"written to {out}/ (conditions.md, conditions.html, conditions.csv, conditions_summary.csv, "
          f"conditions.json) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_text(args: Any) -> int:
    """``hydra-probe text``: read and check the texts, load the model, measure, write the folder."""

    from .components import select_groups
    from .effects.text import read_texts, text_self_repair

    texts = read_texts(args.texts)  # bad files fail before the model loads
    model = _load_model(args)
    comps = _components(args.components)
    select_groups(model, comps)
    t0 = time.perf_counter()
    _say(args, f"measuring self-repair at every position of {len(texts)} texts on {model.name} ...")
    res = text_self_repair(model, texts, comps, value=args.value, top_fraction=args.top_fraction, scale=args.scale,
                           seed=args.seed, window=args.window, progress=False if args.quiet else None)
    out = res.write_report(args.out, overwrite=args.overwrite)
    p = res.provenance
    print(f"model {p.get('model')} | {p.get('n_texts')} texts, {p.get('n_positions')} positions | ablation "
          f"{p.get('value')} | metric next-token logit | top {100 * args.top_fraction:g} % of positions by DE")
    s = res.summary().sort_values("self_repair", ascending=False, kind="stable").head(args.rows)
    print(text_table(s[["component", "n_top", "direct_effect", "de_lost", "total_effect", "self_repair",
                        "sr_over_de_lost", "norm_share"]].round(4)))
    print(f"written to {out}/ (summary.md, summary.csv, positions.csv, top_contributions.csv, runs.csv, "
          "text_self_repair.json) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


COMMANDS = {"report": cmd_report, "ablate": cmd_ablate, "graph": cmd_graph, "conditions": cmd_conditions,
            "text": cmd_text}


# ============================================================================ main
def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hydra-probe`` console script; returns the exit code."""
    from .errors import InputError, NumericalError

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    restore = _on_sigterm_interrupt()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise UsageError(f"choose a command: report, ablate, graph, conditions or text (see '{PROG} --help')")
        debug = args.debug
        check_args(args)
        return COMMANDS[args.command](args)
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        _err(str(e))
        return 2
    except (InputError, NumericalError) as e:  # NaN/inf activations come from the model given: bad input too
        _err(str(e))
        return 2
    except KeyboardInterrupt:
        _err("interrupted; nothing was written")
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if debug:
            import traceback

            traceback.print_exc()
        _err(f"unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)")
        return 1
    finally:
        restore()


def _on_sigterm_interrupt() -> Any:
    """Handle SIGTERM like Ctrl-C (KeyboardInterrupt: atomic writes remove their temporary files) while
    :func:`main` runs; returns the function that restores the previous handler (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
