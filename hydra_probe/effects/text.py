"""Self-repair on natural text (Rushing & Nanda 2024): every position is a measurement.

On a text with tokens ``t_0 .. t_{T-1}``, position ``p`` reads the metric
``m_p = logit of t_{p+1}`` (the actual next token), a linear metric with
direction ``u_p = W_U[t_{p+1}]`` (nothing subtracted). For every ablated
component c, position p and text (DESIGN.md section 2, at position p):

    DE_c   = <gamma P(out_c), u_p> / sigma_p                (clean run, clean scale)
    DEL_c  = DE_c - DE_c(replacement; sigma_p)
    TE_c   = m_p(clean) - m_p(c ablated at every position)
    SR_c   = DEL_c - TE_c
    norm   = the final norm's part of SR_c (NORM in self_repair's decomposition, either scale policy)

Every term is computed by :mod:`.self_repair`'s decomposition on the positions
read (each position is one "prompt" of it), so post-attention norms
(``postnorm_term``, the POSTNORM rows summed) and a final logit soft-cap
(``softcap_term``; DE on the raw logit, TE on the capped one) follow the
same definitions as on prompt tasks.

Each ablation is one forward per copy (component) over whole texts; the
runner returns the final residual at every position, and the clean run's
activations are read at every position, so position p of the whole-text run
equals a run on the prefix ``t_0 .. t_p`` (causal attention) read at its end.

Ablation values:

* ``zero``: zeros.
* ``mean``: per position q, the mean over the texts that reach q; positions
  that only one text reaches are not read (the longest text is cut where the
  second-longest ends, counted in ``provenance["positions_dropped"]``), since
  a mean over one text would replace its activation by itself.
* ``resample`` (default): each text takes one donor, another text drawn with
  the seed among those at least as long; the donor's activation at the same
  position replaces the component's. A text longer than every other text takes
  the longest other one as donor and is measured only where the donor reaches
  (its later positions are dropped; ``provenance["positions_dropped"]`` counts
  them). Donors repeat (drawn with replacement).

Texts longer than the model's context are refused unless ``window=N``
splits every text into consecutive windows of at most N tokens (a BOS token,
where the tokenizer adds one, starts every window); each window is its own
run, and ``position`` still counts in the whole tokenized text.

:meth:`TextSelfRepair.summary` conditions, per component, on the top
``top_fraction`` of positions by clean direct effect (Rushing & Nanda: the
top 2 %), with percentile intervals from a cluster bootstrap over texts
(positions of one text are not independent).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..checks import public
from ..components import select_groups
from ..errors import OptionError, TaskError
from ..interventions import check_value, interventions_for
from ..metrics import Metric, direction, get_metric
from ..models.sites import Site
from ..results import Result, provenance
from ..runner import Readout, Runner
from ..tasks.task import Task
from .common import as_model, check_scale, check_writers
from .self_repair import Partition, RunReadout, decompose_run

#: The metric of text mode, recorded in provenance.
NEXT_TOKEN_LOGIT = Metric("next_token_logit", True, lambda lg, a, b: lg.gather(-1, a.view(-1, 1)).squeeze(-1),
                          description="logit of the actual next token t_{p+1} at each position p")

FRAME_COLUMNS = ("component", "text", "position", "token", "token_id", "direct_effect", "de_lost", "total_effect",
                 "self_repair", "norm_term", "postnorm_term", "softcap_term", "clean_logit", "ablated_logit")


# ============================================================================ inputs
def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a file: one text a line, or JSONL objects with a ``"text"`` field.

    A file whose first non-blank line starts with ``{`` (or named ``*.jsonl``)
    is read as JSONL. Blank lines are skipped. Lines that are not valid UTF-8,
    malformed JSON or objects without a string ``"text"`` raise
    :class:`~hydra_probe.errors.TaskError` naming the line number.
    """
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"texts file {str(p)!r} does not exist; give a file with one text a line, or JSONL "
                        "objects with a 'text' field.")
    raw = p.read_bytes().split(b"\n")
    lines: list[tuple[int, str]] = []
    for i, b in enumerate(raw, start=1):
        try:
            s = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{p}:{i}: not valid UTF-8 (byte 0x{b[e.start]:02x} at column {e.start + 1}); "
                            "save the file as UTF-8.") from None
        s = s.rstrip("\r")
        if s.strip():
            lines.append((i, s))
    if not lines:
        raise TaskError(f"texts file {p} holds no text; write one text a line.")
    jsonl = p.suffix == ".jsonl" or lines[0][1].lstrip().startswith("{")
    if not jsonl:
        return [s for _, s in lines]
    out = []
    for i, s in lines:
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise TaskError(f"{p}:{i}: malformed JSON ({e.msg}); each line must be one object with a 'text' "
                            "field.") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise TaskError(f"{p}:{i}: a line must be a JSON object with a string 'text' field.")
        out.append(obj["text"])
    return out


def context_length(model: Any) -> int | None:
    """The model's context in tokens (``n_positions`` / ``max_position_embeddings``), or None if unstated."""
    cfg = getattr(model.hf_model, "config", None)
    for a in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(cfg, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@dataclass
class Unit:
    """One run: a text (or a window of it). ``ids`` (T,) as run; ``offset``: text position of ids[n_bos]
    minus n_bos; ``targets`` (T,) next-token ids (-1 where none); ``first``: first position read."""

    text: int
    ids: torch.Tensor
    offset: int
    targets: torch.Tensor
    first: int


def _tokenize(model: Any, texts: Any, window: int | None) -> tuple[list[Unit], int, int | None]:
    """Tokenize and window the texts; returns (units, number of BOS tokens added, context)."""
    if isinstance(texts, str):
        raise TaskError("texts is a single string; pass a list of texts (e.g. [text]) or read a file with "
                        "read_texts(path).")
    texts = list(texts)
    if not texts:
        raise TaskError("the text list is empty; give at least one text (two or more for value='resample').")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TaskError(f"text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string; texts are strings.")
    ctx = context_length(model)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise OptionError(f"window must be an integer of at least 2 tokens, or None; got {window!r}.")
        if ctx is not None and window > ctx:
            raise OptionError(f"window={window} exceeds the model's context of {ctx} tokens; use window <= {ctx}.")
    tok = model.tokenizer
    bos_id = getattr(tok, "bos_token_id", None)
    vocab = model.adapter.vocab_size
    units: list[Unit] = []
    n_bos_all = 0
    for i, t in enumerate(texts):
        ids = list(tok(t)["input_ids"])
        n_bos = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
        n_bos_all = max(n_bos_all, n_bos)
        if len(ids) < 2:
            raise TaskError(f"text {i} ({t[:40]!r}) is {len(ids)} token(s) for this tokenizer; each position reads "
                            "the logit of the next token, so a text needs at least 2 tokens. Remove it or make it "
                            "longer.")
        if max(ids) >= vocab:
            raise TaskError(f"text {i} has token id {max(ids)}, beyond the model's vocabulary ({vocab}); the "
                            "tokenizer does not match the model.")
        full = torch.tensor(ids, dtype=torch.long)
        nxt = torch.cat([full[1:], torch.tensor([-1])])
        if window is None:
            if ctx is not None and len(ids) > ctx:
                raise TaskError(f"text {i} is {len(ids)} tokens, beyond the model's context of {ctx}; refused. Pass "
                                f"window={ctx} (the CLI's --window {ctx}) to split long texts into windows of at most "
                                f"{ctx} tokens, each run on its own, or shorten the text.")
            units.append(Unit(i, full, 0, nxt, 0))
            continue
        body = window - n_bos
        if body < 1:
            raise OptionError(f"window={window} leaves no room beside the BOS token; use window >= {n_bos + 1}.")
        for k, s in enumerate(range(n_bos, len(ids), body)):
            chunk = full[s: s + body]
            u_ids = torch.cat([full[:n_bos], chunk])
            # unit position j >= n_bos is text position s - n_bos + j; later windows do not read their BOS
            off = s - n_bos
            tg = torch.cat([torch.full((n_bos,), -1, dtype=torch.long), nxt[s: s + body]])
            if k == 0:
                tg[:n_bos] = nxt[:n_bos]
            if (tg >= 0).any() and len(u_ids) >= 1 + n_bos:
                units.append(Unit(i, u_ids, off, tg, 0 if k == 0 else n_bos))
    return units, n_bos_all, ctx


def _donors(units: list[Unit], seed: int) -> tuple[list[int], int]:
    """Per unit, a donor unit of another text (seeded; see module doc) and the number of positions dropped."""
    if len({u.text for u in units}) < 2:
        raise TaskError("value='resample' takes each text's replacement from another text; give at least two texts, "
                        "or use value='mean' or 'zero'.")
    rng = np.random.default_rng(seed)
    donors = []
    for u in units:
        others = [j for j, v in enumerate(units) if v.text != u.text]
        longer = [j for j in others if len(units[j].ids) >= len(u.ids)]
        if longer:
            donors.append(int(longer[rng.integers(len(longer))]))
        else:
            top = max(len(units[j].ids) for j in others)
            cands = [j for j in others if len(units[j].ids) == top]
            donors.append(int(cands[rng.integers(len(cands))]))
    dropped = 0
    for i, j in enumerate(donors):
        T = len(units[j].ids)
        if T < len(units[i].ids):
            dropped += int((units[i].targets[T:] >= 0).sum())
    return donors, dropped


def _build_task(model: Any, units: list[Unit], value: str, seed: int
                ) -> tuple[Task, list[Unit], int, pd.DataFrame]:
    """The runner's task: one prompt per unit; for resample, the corrupted prompt is the donor (same length).

    Also returns the runs frame: ``run``, ``text``, ``offset``, ``n_tokens`` (as run), ``donor_run``,
    ``donor_text`` (-1 without resample).
    """
    dropped = 0
    corr = [u.ids for u in units]
    donors = [-1] * len(units)
    if value == "resample":
        donors, dropped = _donors(units, seed)
        cut = []
        for u, j in zip(units, donors):
            T = min(len(u.ids), len(units[j].ids))
            cut.append(Unit(u.text, u.ids[:T], u.offset, u.targets[:T], u.first))
        corr = [units[j].ids[: len(c.ids)] for c, j in zip(cut, donors)]
        units = cut
    if value == "mean":
        # a per-position mean over a single run would replace that run's activation by itself (TE = SR = 0):
        # positions only one run reaches are not read (cut where the second-longest run ends)
        if len(units) < 2:
            raise TaskError("value='mean' averages over the texts at each position; give at least two texts, or use "
                            "value='zero'.")
        second = sorted(len(u.ids) for u in units)[-2]
        cut = []
        for u in units:
            if len(u.ids) > second:
                dropped += int((u.targets[second:] >= 0).sum())
            cut.append(Unit(u.text, u.ids[:second], u.offset, u.targets[:second], u.first)
                       if len(u.ids) > second else u)
        units = cut
        corr = [u.ids for u in units]
    clean = [u.ids for u in units]
    ans = torch.tensor([int(u.ids[-1]) for u in units])
    pairs = [{"clean": "", "corrupted": "", "answer": "", "alternative": ""} for _ in units]
    task = Task(pairs, "text", "none" if value != "resample" else "resample-donor", seed, clean, corr, ans, ans,
                getattr(model, "name", ""))
    runs = pd.DataFrame({"run": range(len(units)), "text": [u.text for u in units],
                         "offset": [u.offset for u in units], "n_tokens": [len(u.ids) for u in units],
                         "donor_run": donors, "donor_text": [units[j].text if j >= 0 else -1 for j in donors]})
    return task, units, dropped, runs


# ============================================================================ result
class TextSelfRepair(Result):
    """Per component x text x position: ``direct_effect``, ``de_lost``, ``total_effect``, ``self_repair``.

    Columns: ``component``, ``text`` (index into the texts given),
    ``position`` (index of the read token in the tokenized text, BOS
    included), ``token`` (the actual next token t_{p+1}, decoded), ``token_id``,
    ``direct_effect``, ``de_lost``, ``total_effect``, ``self_repair``,
    ``norm_term`` (the final norm's part of self_repair under the scale
    policy), ``postnorm_term`` (post-attention norms' part; 0 without them),
    ``softcap_term`` (the logit soft-cap's part; 0 without one),
    ``clean_logit``, ``ablated_logit`` (the model's own, capped, logits). All
    in logits of t_{p+1}.
    """

    kind = "text_self_repair"

    def top_contributions(self) -> pd.DataFrame:
        """Who compensates on text: per ablated ``component`` and ``downstream`` row of the decomposition
        (every head and MLP it can reach, ``POSTNORM{l}``, ``NORM``, ``SOFTCAP``), the mean ``delta_de`` over
        the component's top positions by clean DE (at the ``top_fraction`` the result was made with) and its
        ``share_of_self_repair`` (sum over those positions / their summed self-repair; the rows of one
        component sum to 1)."""
        return self.extras["top_contributions"].copy()

    def runs(self) -> pd.DataFrame:
        """One row per run (a text or a window of it): ``run``, ``text``, ``offset`` (text position of the run's
        first token after any BOS, minus the BOS), ``n_tokens``, ``donor_run``, ``donor_text`` (resample; else -1)."""
        return self.extras["runs"].copy()

    def summary(self, top_fraction: float | None = None, level: float = 0.95, n_boot: int = 1000,
                seed: int | None = None) -> pd.DataFrame:
        """Per component, on its top ``top_fraction`` of positions by clean direct effect (default: the
        fraction the result was made with).

        Columns: ``component``, ``n_positions`` (all), ``n_top``, ``n_texts`` (texts among the top),
        ``de_threshold`` (smallest DE kept); means of ``direct_effect``, ``de_lost``, ``total_effect``,
        ``self_repair``; ``sr_over_de_lost`` (median over the top positions of SR/DE lost, positions with DE
        lost = 0 left out); ``norm_share`` (sum of norm_term / sum of self_repair: the final norm's share of
        the self-repair); ``hydra_slope`` (OLS slope of TE on DE lost across the top positions; < 1: the
        ablation understates the role); each with ``_lo``/``_hi``, a percentile cluster bootstrap over texts.
        """
        f = check_fraction(self.provenance.get("top_fraction", 0.02) if top_fraction is None else top_fraction)
        seed = int(self.provenance.get("seed") or 0) if seed is None else seed
        rows = []
        for c, g in self._frame.groupby("component", sort=False):
            top = select_top(g, f)
            row: dict[str, Any] = {"component": c, "n_positions": len(g), "n_top": len(top),
                                   "n_texts": int(top["text"].nunique()),
                                   "de_threshold": float(top["direct_effect"].min())}
            row.update(_top_stats(top, level, n_boot, seed))
            rows.append(row)
        out = pd.DataFrame(rows)
        out.attrs["interval"] = (f"{int(level * 100)}% percentile bootstrap, resampling texts ({n_boot} draws, seed "
                                 f"{seed}); top {100 * f:g} % of positions by clean direct effect, per component")
        return out

    def hydra_slope(self, top_fraction: float | None = None, level: float = 0.95) -> dict[str, float]:
        """Across components: OLS of mean TE on mean DE lost over each component's top positions (DESIGN's slope)."""
        from ..stats import hydra_slope

        s = self.summary(top_fraction, level, n_boot=1)
        return hydra_slope(s["total_effect"].to_numpy(), s["de_lost"].to_numpy(), level)


    def markdown(self, top_fraction: float | None = None, rows: int = 15) -> str:
        """A short Markdown summary: conditions, the rule, the Hydra slope and the components with most self-repair."""
        p = self.provenance
        f = check_fraction(p.get("top_fraction", 0.02) if top_fraction is None else top_fraction)
        s = self.summary(f)
        hs = self.hydra_slope(f)
        val = p.get("value")
        lines = [
            "# Self-repair on natural text", "",
            f"- model: `{p.get('model')}` ({p.get('dtype')})",
            f"- texts: {p.get('n_texts')} ({p.get('n_runs')} runs, {p.get('n_positions')} positions read"
            + (f"; windows of {p.get('window')} tokens" if p.get("window") else "")
            + (f"; {p.get('positions_dropped')} position(s) dropped where no donor reached" if p.get("positions_dropped")
               else "") + ")",
            f"- metric: {NEXT_TOKEN_LOGIT.description}",
            f"- ablation: {val}" + (f" ({p.get('donors')})" if val == "resample" else ""),
            f"- final-norm scale: {p.get('scale')} (splits off the norm term only; DE lost and SR are at the clean "
            "scale)",
            f"- seed: {p.get('seed')}; package version {p.get('version')}", "",
            f"Per component, only its top {100 * f:g} % of positions by clean direct effect count (Rushing & Nanda 2024). "
            "TE = logit(clean) - logit(ablated); DE lost = clean DE - DE of the replacement; self-repair = DE lost "
            "- TE; SR/DE lost: median over those positions; norm share: the final norm's part of the self-repair "
            f"(sum over sum). Intervals: {s.attrs.get('interval', '')}.", "",
            f"Hydra slope across components (OLS of mean TE on mean DE lost): {_fmt(hs['slope'])} "
            f"[{_fmt(hs['slope_lo'])}, {_fmt(hs['slope_hi'])}] over {hs['n']} components; below 1, single ablations "
            "understate roles.", "",
            f"## The {min(rows, len(s))} components with the most self-repair", "",
            "| component | positions | DE | DE lost | TE | self-repair | SR / DE lost | norm share | Hydra slope |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s.sort_values("self_repair", ascending=False, kind="stable").head(rows).itertuples():
            lines.append(f"| {r.component} | {r.n_top} of {r.n_positions} | {_fmt(r.direct_effect)} | "
                         f"{_fmt(r.de_lost)} | {_fmt(r.total_effect)} | "
                         f"{_ci(r.self_repair, r.self_repair_lo, r.self_repair_hi)} | "
                         f"{_ci(r.sr_over_de_lost, r.sr_over_de_lost_lo, r.sr_over_de_lost_hi)} | "
                         f"{_ci(r.norm_share, r.norm_share_lo, r.norm_share_hi)} | "
                         f"{_ci(r.hydra_slope, r.hydra_slope_lo, r.hydra_slope_hi)} |")
        tc = self.extras.get("top_contributions")
        if tc is not None and len(tc) and (top_fraction is None or f == p.get("top_fraction")):
            lines += ["", "## Who compensates", "",
                      f"For the five components with the most self-repair: the three largest rows of the exact "
                      f"decomposition (downstream heads and MLPs, NORM for the final norm, POSTNORM/SOFTCAP where "
                      f"the model has them), mean change of direct effect over the component's top {100 * f:g} % "
                      "of positions, and its share of the self-repair.", "",
                      "| component | compensator | mean delta DE | share |", "|---|---|---|---|"]
            for c in s.sort_values("self_repair", ascending=False, kind="stable").head(5)["component"]:
                g = tc[tc["component"] == c].sort_values("delta_de", ascending=False, kind="stable").head(3)
                for r in g.itertuples():
                    lines.append(f"| {c} | {r.downstream} | {_fmt(r.delta_de)} | {_fmt(r.share_of_self_repair)} |")
        return "\n".join(lines) + "\n"

    def write_report(self, folder: str | os.PathLike, overwrite: bool = False, top_fraction: float | None = None
                     ) -> Path:
        """Write ``folder`` atomically: ``text_self_repair.json`` (this result), ``positions.csv`` (the frame),
        ``summary.csv``, ``runs.csv``, ``top_contributions.csv`` and ``summary.md``. Refuses a non-empty folder unless ``overwrite``."""
        from ..errors import OutputError
        from ..io import atomic_folder

        out = Path(folder)
        if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
            raise OutputError(f"the output folder {str(out)!r} exists and is not empty (or is a file); pass "
                              "overwrite=True (--overwrite) or choose another folder.")
        with atomic_folder(out, overwrite=out.exists()) as tmp:
            self.save(tmp / "text_self_repair.json")
            self._frame.to_csv(tmp / "positions.csv", index=False)
            self.summary(top_fraction).to_csv(tmp / "summary.csv", index=False)
            self.runs().to_csv(tmp / "runs.csv", index=False)
            self.top_contributions().to_csv(tmp / "top_contributions.csv", index=False)
            (tmp / "summary.md").write_text(self.markdown(top_fraction), encoding="utf-8")
        return out


def _fmt(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "" if math.isnan(v) else f"{v:.3g}"


def _ci(m: Any, lo: Any, hi: Any) -> str:
    return _fmt(m) if not np.isfinite(lo) else f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]"


def check_fraction(top_fraction: Any) -> float:
    """``top_fraction`` must be a number in (0, 1]."""
    if isinstance(top_fraction, bool) or not isinstance(top_fraction, (int, float)) \
            or not 0 < float(top_fraction) <= 1:
        raise OptionError(f"top_fraction must be a number in (0, 1] (e.g. 0.02 for the top 2 % of positions by "
                          f"direct effect, 1 for all); got {top_fraction!r}.")
    return float(top_fraction)


def select_top(frame: pd.DataFrame, top_fraction: float) -> pd.DataFrame:
    """The ``ceil(top_fraction * n)`` rows (at least one) with the largest ``direct_effect``.

    Ties at the cut are broken by row order (stable sort), so exactly that many rows are kept.
    """
    f = check_fraction(top_fraction)
    k = max(1, math.ceil(f * len(frame) - 1e-9))
    order = np.argsort(-frame["direct_effect"].to_numpy(dtype=float), kind="stable")[:k]
    return frame.iloc[np.sort(order)]


def _top_stats(top: pd.DataFrame, level: float, n_boot: int, seed: int) -> dict[str, float]:
    """Point estimates and cluster-bootstrap intervals (over texts) for one component's top positions."""
    from ..stats import hydra_slope

    de, dl = top["direct_effect"].to_numpy(float), top["de_lost"].to_numpy(float)
    te, sr = top["total_effect"].to_numpy(float), top["self_repair"].to_numpy(float)
    nt = top["norm_term"].to_numpy(float)
    texts = top["text"].to_numpy()
    clusters, cl = np.unique(texts, return_inverse=True)
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(clusters), size=(n_boot, len(clusters)))
    counts = np.zeros((n_boot, len(clusters)))
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(clusters)), draw.reshape(-1)), 1.0)
    w = counts[:, cl]                                   # (n_boot, rows): multiplicity of each row
    wsum = w.sum(1)
    out: dict[str, float] = {}
    a = (1 - level) / 2

    def put(name: str, point: float, boot: np.ndarray) -> None:
        b = boot[np.isfinite(boot)]
        out[name] = point
        lo, hi = (np.quantile(b, [a, 1 - a]) if b.size >= 2 and len(clusters) >= 2 else (np.nan, np.nan))
        out[f"{name}_lo"], out[f"{name}_hi"] = float(lo), float(hi)

    for name, v in (("direct_effect", de), ("de_lost", dl), ("total_effect", te), ("self_repair", sr)):
        put(name, float(v.mean()), (w @ v) / wsum)
    ok = dl != 0
    ratio = np.where(ok, sr / np.where(ok, dl, 1.0), np.nan)
    put("sr_over_de_lost", float(np.median(ratio[ok])) if ok.any() else float("nan"), _weighted_median(ratio, w))
    with np.errstate(invalid="ignore", divide="ignore"):
        put("norm_share", float(nt.sum() / sr.sum()) if sr.sum() != 0 else float("nan"), (w @ nt) / (w @ sr))
        s = hydra_slope(te, dl, level)
        mx, my = (w @ dl) / wsum, (w @ te) / wsum
        cov = (w * (dl - mx[:, None]) * (te - my[:, None])).sum(1)
        var = (w * (dl - mx[:, None]) ** 2).sum(1)
        put("hydra_slope", s["slope"], np.where(var > 1e-300, cov / var, np.nan))
    return out


def _weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row of weights ``w`` (n_boot, n), the weighted median of ``x`` (n,) over its finite entries."""
    ok = np.isfinite(x)
    if not ok.any():
        return np.full(w.shape[0], np.nan)
    xs, ws = x[ok], w[:, ok]
    order = np.argsort(xs, kind="stable")
    xs, ws = xs[order], ws[:, order]
    cw = ws.cumsum(1)
    tot = cw[:, -1:]
    lo = (cw >= tot / 2).argmax(1)
    hi = (cw > tot / 2).argmax(1)
    return np.where(tot[:, 0] > 0, (xs[lo] + xs[hi]) / 2, np.nan)


# ============================================================================ computation
@public
def text_self_repair(model: Any, texts: Sequence[str], components: Any = "heads", value: str = "resample",
                     top_fraction: float = 0.02, scale: str = "frozen", seed: int = 0, *,
                     window: int | None = None, batch_components: int = 8, memory_budget: float = 2 ** 29,
                     progress: bool | None = None) -> TextSelfRepair:
    """Self-repair at every position of every text (see module doc).

    Args:
        model: a :class:`~hydra_probe.models.HookedModel` (or anything ``load_model`` takes).
        texts: list of strings.
        components: selector as elsewhere ("heads", "mlps", "layers", "all", names, "A+B" groups).
        value: ``"resample"`` (default), ``"mean"`` or ``"zero"``.
        top_fraction: fraction of positions (by clean DE, per component) that ``summary()`` keeps, in (0, 1].
        scale: ``"frozen"`` or ``"recomputed"``: how ``norm_term`` is split off (DE, DEL, TE, SR do not depend on it).
        seed: seeds resample donors and the summary's bootstrap.
        window: None refuses texts longer than the model's context; an int splits texts into windows of at
            most that many tokens.
        batch_components: at most this many components per :meth:`Runner.run` call; fewer when the
            ablated runs' outputs at every position (every head and MLP, and the final residual) would
            exceed ``memory_budget`` bytes.

    Returns:
        :class:`TextSelfRepair`; one row per component x text x position read.
    """
    model = as_model(model)
    check_scale(scale)
    if not isinstance(value, str):
        raise OptionError("text mode takes value='zero', 'mean' or 'resample' (a reference Task is not supported: "
                          "the mean is over the texts themselves).")
    vname = check_value(value)
    f = check_fraction(top_fraction)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"seed must be an integer; got {seed!r}.")
    if isinstance(batch_components, bool) or not isinstance(batch_components, int) or batch_components < 1:
        raise OptionError(f"batch_components must be a positive integer; got {batch_components!r}.")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget > 0:
        raise OptionError(f"memory_budget must be a positive number of bytes; got {memory_budget!r}.")
    groups = select_groups(model, components)
    check_writers(groups, "self-repair")
    units, _, ctx = _tokenize(model, texts, window)
    task, units, dropped, runs = _build_task(model, units, vname, seed)
    runner = Runner(model, task, get_metric("logit"), seed=seed, progress=progress)
    ivalue = "corrupted" if vname == "resample" else vname
    copies = [interventions_for(g.members, ivalue, model.head_dim, None) for g in groups]
    tok = model.tokenizer
    clean = [_clean_side(model, runner, gi, idx, units) for gi, idx in enumerate(runner.groups)]
    parts = [Partition.of(g, next(c for c in clean if c is not None)["ro"], model.parallel_residual)
             for g in groups]
    L = model.n_layers
    sites = frozenset(Site(l, k) for l in range(L) for k in ("z", "mlp_out"))
    # the ablated runs' every head and MLP output at every position, plus the final residual: bound the memory
    n_pos = sum(len(idx) * int(runner.task.clean_ids[idx[0]].shape[0]) for idx in runner.groups)
    per_copy = n_pos * (L * (model.n_heads * model.head_dim + model.d_model) + model.d_model) * 4
    k_max = max(1, min(batch_components, int(memory_budget // max(per_copy, 1))))
    capped = model.adapter.softcap is not None
    frames, tops = [], []
    for s0 in range(0, len(groups), k_max):
        chunk = list(range(s0, min(s0 + k_max, len(groups))))
        # one forward per copy over whole texts; the runner returns every position
        outs = runner.run("clean", [copies[k] for k in chunk], label="text self-repair", capture=sites,
                          capture_positions="all")
        for k, o in zip(chunk, outs):
            per, cons = [], []
            for gi, cs in enumerate(clean):
                if cs is None:
                    continue
                ablated = _readout_rows(cs, {s: v[gi] for s, v in o.captures.items()}, o.resid_all[gi], L)
                fr, con = decompose_run(groups[k].name, parts[k], clean=cs["readout"], ablated=ablated, scale=scale,
                                     softcap=capped)
                per.append(fr.assign(text=cs["text"].numpy(), position=cs["position"].numpy(),
                                     token_id=cs["targets"].numpy()))
                cons.append(con)
            fk = pd.concat(per, ignore_index=True)
            frames.append(fk)
            tops.append(_top_contributions(fk, cons, f))
    frame = pd.concat(frames, ignore_index=True)
    ids = frame["token_id"].to_numpy()
    uniq = np.unique(ids)
    names = {int(t): tok.decode([int(t)]) for t in uniq}
    frame["token"] = [names[int(t)] for t in ids]
    order = {g.name: i for i, g in enumerate(groups)}
    frame = frame.assign(_c=frame["component"].map(order)).sort_values(["_c", "text", "position"], kind="stable")
    frame = frame.drop(columns="_c").rename(columns={"clean_de": "direct_effect", "clean_metric": "clean_logit",
                                                     "ablated_metric": "ablated_logit"})
    frame = frame[list(FRAME_COLUMNS)].reset_index(drop=True)
    prov = provenance(model, task, metric=NEXT_TOKEN_LOGIT, value=vname, scale=scale, seed=seed)
    prov.update({"n": len({u.text for u in units}), "n_texts": len(list(texts)), "n_runs": len(units),
                 "n_positions": int(len(frame) // max(len(groups), 1)), "top_fraction": f, "window": window,
                 "context": ctx, "positions_dropped": dropped,
                 "donors": ("one donor text per text, drawn with the seed among the other texts at least as long "
                            "(the longest text takes the longest other one and is cut where it ends); the donor's "
                            "activation at the same position replaces the component's") if vname == "resample"
                 else None,
                 "position_rule": "position p reads the logit of the actual token at p+1; BOS positions of windows "
                                  "after the first are not read"})
    return TextSelfRepair(frame, prov, {"runs": runs, "top_contributions": pd.concat(tops, ignore_index=True)})


def _top_contributions(fk: pd.DataFrame, cons: list[pd.DataFrame], top_fraction: float) -> pd.DataFrame:
    """Mean of each downstream row of the decomposition over one component's top positions by clean DE
    (selected as :func:`select_top` does on the sorted frame)."""
    names = list(dict.fromkeys(cons[0]["downstream"]))  # one row per downstream name and prompt, prompt-major
    mat = np.concatenate([c["delta_de"].to_numpy().reshape(-1, len(names)) for c in cons])   # (rows, names)
    order = np.lexsort((fk["position"].to_numpy(), fk["text"].to_numpy()))                   # the frame's order
    top = select_top(fk.iloc[order].rename(columns={"clean_de": "direct_effect"}), top_fraction)
    rows = top.index.to_numpy()                         # positions in fk (iloc order == index order)
    vals = mat[rows]
    return pd.DataFrame({"component": fk["component"].iloc[0], "downstream": names, "n_top": len(rows),
                         "delta_de": vals.mean(0), "share_of_self_repair": vals.sum(0) / top["self_repair"].sum()
                         if top["self_repair"].sum() != 0 else np.nan})


def _clean_side(model: Any, runner: Runner, gi: int, idx: list[int], units: list[Unit]) -> dict[str, Any] | None:
    """Everything of length group ``gi`` that does not depend on the ablated component: the positions read
    (N rows, as the decomposition's "prompts"), their readout and the clean run's :class:`RunReadout`."""
    ad = model.adapter
    L = ad.n_layers
    P = runner.prefix(gi, "clean")
    T = len(runner.task.clean_ids[runner.groups[gi][0]])  # (not from P: a remote run fetches only what is read)
    tgt = torch.stack([units[i].targets for i in idx])                        # (B, T)
    first = torch.tensor([units[i].first for i in idx])
    mask = (tgt >= 0) & (torch.arange(T)[None, :] >= first[:, None])
    if not mask.any():
        return None
    bi, pi = torch.nonzero(mask, as_tuple=True)
    targets = tgt[bi, pi]
    u, bias = direction(ad, get_metric("logit"), targets, targets)
    ro = Readout.build(model, u, bias)

    def rows(x: torch.Tensor) -> torch.Tensor:                                # (B, T, w) -> (N, w)
        return x[bi.to(x.device), pi.to(x.device)].to(ro.u.device)

    caps = {Site(l, k): P.captures[Site(l, k)] for l in range(L) for k in ("z", "mlp_out")}
    cs: dict[str, Any] = {"ro": ro, "rows": rows, "targets": targets, "softcap": ad.apply_softcap,
                          "text": torch.tensor([units[i].text for i in idx])[bi],
                          "position": torch.tensor([units[i].offset for i in idx])[bi] + pi}
    cs["readout"] = _readout_rows(cs, caps, P.resid[L], L)
    return cs


def _readout_rows(cs: dict[str, Any], caps: dict[Site, torch.Tensor], resid: torch.Tensor, L: int) -> RunReadout:
    """One run's :class:`RunReadout` at the rows read: ``caps`` z / mlp_out and ``resid`` are (B, T, width)."""
    ro, rows = cs["ro"], cs["rows"]
    z = [rows(caps[Site(l, "z")]) for l in range(L)]
    mlp = [rows(caps[Site(l, "mlp_out")]) for l in range(L)]
    x = rows(resid).to(torch.float64)
    sig = ro.sigma(x)
    raw = ro.project(x) / sig + ro.beta_u
    post = ro.post_sigma(z)
    n = x.shape[0]
    return RunReadout(metric=cs["softcap"](raw).cpu(), raw_metric=raw.cpu(), proj=ro.projections(z, mlp).cpu(),
                      resid_proj=ro.project(x).cpu(), sigma=sig.cpu(), post_scale=ro.column_scale(post, n))
