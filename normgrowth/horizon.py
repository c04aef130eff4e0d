"""The effective layer horizon with live and frozen norm scales, and the causal mean-ablation check.

**Horizon.** Blocks are numbered ``0 .. n_layers - 1``; the final norm reads as block ``n_layers``. A reader
of block ``L`` (its attention's input norm, its MLP's input norm) or the final norm normally reads the
whole stream ``r_L``. With horizon ``n`` it reads only the writes of the last ``n`` blocks: with
``b = L - n``, the writes older than block ``b`` (the embedding and the attn/mlp outputs of blocks
``< b``) are replaced by their token-mean,

    r_L^(n) = r_L - sum_{c old} (w_c - mean w_c) = r_L - (x_b - mean x_b),    x_b = resid_pre.b,

because the old writes sum to the stream entering block ``b``. Nothing is replaced when ``b <= 0`` (so
``n = n_layers`` is the clean model, and the embedding counts with block 0). ``mean x_b`` is the clean
mean over the calibration sequences' tokens at positions >= 1; position 0 is never replaced. It is a real
intervention: ``x_b`` is the stream of the ablated pass itself (every later write is recomputed from
ablated inputs), only the readers' inputs are changed (the stream each later block adds to is not).

Readers: the inputs of each block's attention norm and MLP norm (pre and peri placement, LN-free
checkpoints; parallel blocks that share one norm have one reader), or, without input norms (post
placement, OLMo 2), the attention's and the MLP's raw inputs, which no norm divides (there live and frozen
differ only through the final norm).

* **live**: each norm computes its scale ``s_L(t)`` from the modified input, as the model does;
* **frozen**: each reader's scale is held at its clean value for that token (``hook_scale`` replaced),
  so the norm divides the modified, centred input by the clean ``s_L(t)``: the division is removed from
  the ablation's effect.

``loss(n)``: mean next-token cross-entropy over the evaluation sequences' predictions at positions
``t >= 1`` whose target ``t + 1`` is a real token. Relative excess ``e(n) = loss(n) / clean - 1``; the
horizon within ``q`` is the smallest grid ``n`` from which every larger grid point has ``e <= q``
(``n_layers`` always qualifies).

**Causal check.** One write at a time (its own site) is replaced at positions >= 1 by its mean over the
calibration tokens; measured: ``KL(p_clean || p_ablated)`` of the next-token distribution (mean over
positions >= 1) and, at every later reader (block input ``resid_pre.l``, the final stream), the relative
change of its normalised input ``||N(x_abl) - N(x)|| / ||N(x)||``. Repeated with every reader's scale frozen
at its clean value (there ``N(x_abl) = P(x_abl) / s_clean``). ``division share = 1 - frozen / live``
(ratio of sums): the part of the effect that passes through the norm's division.

CIs: bootstrap over evaluation sequences (:mod:`normgrowth.numerics`, one resampling scheme); each
replicate recomputes the whole curve and the horizons from it. Formulas: ``docs/horizon.md``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Sequence

import numpy as np
import torch

from .data import TokenBatch, as_token_batch, iter_batches
from .errors import NormgrowthError
from .numerics import DEFAULT_N_BOOT, loglinear_slope, percentile_ci, resample_counts
from .protocol import ResultProtocol
from .storage import json_safe
from .tables import fmt_number, text_table

THRESHOLDS = (0.01, 0.10)  # relative excess loss for "within 1 %" and "within 10 %" of clean
CALIB_FRACTION = 0.25  # share of the sequences used for the means (the rest are evaluated)
DEFAULT_CAUSAL_WRITES = 8  # writes in the default causal check, spread over depth
MODES = ("live", "frozen")


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def default_horizons(n_layers: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48 ... (steps of x1.5 and x4/3) below ``n_layers``, then ``n_layers``."""
    grid = [1, 2, 3, 4] + [m * 2**k for k in range(40) for m in (6, 8) if m * 2**k < n_layers]
    return sorted({n for n in grid if n < n_layers} | {int(n_layers)})


def parse_horizons(text: Any, n_layers: int) -> list[int]:
    """Horizons from ``"1,2,4"`` (or a list), sorted, without duplicates, with ``n_layers`` added; None or
    ``"default"`` gives :func:`default_horizons`. Bad input is one-sentence :class:`NormgrowthError`."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "default")):
        return default_horizons(n_layers)
    items = [t.strip() for t in str(text).split(",")] if isinstance(text, str) else [str(t) for t in text]
    values = []
    for item in items:
        if not item.lstrip("+").isdigit() or not 1 <= int(item) <= n_layers:
            raise NormgrowthError(f"--horizons item {item!r} is not a whole number of layers in 1..{n_layers}: give "
                                  f"a comma-separated list such as 1,2,4,8.")
        values.append(int(item))
    return sorted(set(values) | {n_layers})


def old_blocks(reader_block: int, n: int) -> int:
    """``b = L - n``: the reader of block ``L`` (``n_layers`` for the final norm) with horizon ``n`` replaces
    the stream entering block ``b`` (the embedding and blocks ``< b``) by its mean; 0 = nothing replaced."""
    return max(0, int(reader_block) - int(n))


def relative_excess(loss: Any, clean: Any) -> np.ndarray:
    """``loss / clean - 1`` (broadcast over a trailing horizon axis of ``loss``)."""
    loss = np.asarray(loss, dtype=float)
    clean = np.asarray(clean, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return loss / clean[..., None] - 1.0


def horizon_within(excess: Any, horizons: Sequence[int], threshold: float) -> np.ndarray:
    """Smallest grid horizon ``n`` with ``excess(m) <= threshold`` for every grid ``m >= n``.

    excess: ``[..., H]`` over ``horizons`` (ascending, the last one ``n_layers`` with excess 0 by
    definition). NaN excess counts as above the threshold. Returns ``[...]`` floats.
    """
    e = np.asarray(excess, dtype=float)
    h = np.asarray(horizons, dtype=float)
    ok = np.where(np.isfinite(e), e <= threshold, False)
    ok[..., -1] = True
    # every point from index i on is within: cumulative AND from the right
    tail_ok = np.flip(np.logical_and.accumulate(np.flip(ok, -1), axis=-1), -1)
    first = np.argmax(tail_ok, axis=-1)
    return h[first]


def curve_statistics(seq_clean: np.ndarray, seq_loss: np.ndarray, seq_tokens: np.ndarray, horizons: Sequence[int],
                     n_boot: int = DEFAULT_N_BOOT, seed: int = 0, thresholds: Sequence[float] = THRESHOLDS
                     ) -> dict[str, Any]:
    """Loss curve, relative excess and horizons with bootstrap CIs over sequences.

    seq_clean ``[S]``, seq_loss ``[S, H]``: per-sequence sums of cross-entropy; seq_tokens ``[S]``: predictions
    per sequence. Point: ``loss = sum_s loss_s / sum_s n_s``. Replicate ``b`` draws sequences (counts ``c_bs``)
    and recomputes ``clean_b``, ``loss_b(n)``, ``e_b(n)`` and the horizons from that whole curve.
    """
    seq_clean = np.asarray(seq_clean, dtype=np.float64)
    seq_loss = np.asarray(seq_loss, dtype=np.float64)
    tok = np.asarray(seq_tokens, dtype=np.float64)
    n_tok = tok.sum()
    clean = float(seq_clean.sum() / n_tok)
    loss = seq_loss.sum(0) / n_tok
    excess = relative_excess(loss, np.float64(clean))
    reps_clean, reps_loss = [], []
    for counts in resample_counts(len(tok), n_boot, seed):
        den = counts @ tok
        reps_clean.append(counts @ seq_clean / den)
        reps_loss.append((counts @ seq_loss) / den[:, None])
    rc = np.concatenate(reps_clean)
    rl = np.concatenate(reps_loss)
    re = relative_excess(rl, rc)
    out: dict[str, Any] = {
        "clean": clean, "clean_ci": percentile_ci(rc).as_array().tolist(),
        "loss": loss.tolist(), "loss_ci": percentile_ci(rl).as_array().tolist(),
        "excess": excess.tolist(), "excess_ci": percentile_ci(re).as_array().tolist(),
        "horizon": {}, "_replicates": re,
    }
    for q in thresholds:
        key = threshold_key(q)
        point = float(horizon_within(excess, horizons, q))
        reps = horizon_within(re, horizons, q)
        out["horizon"][key] = {"value": point, "ci": list(percentile_ci(reps).as_array())}
    return out


def threshold_key(q: float) -> str:
    """``0.01 -> "1%"``."""
    return f"{100 * q:g}%"


def gap_statistics(live: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    """``e_live(n) - e_frozen(n)`` per horizon with its CI from the paired replicates (same draws)."""
    diff = live["_replicates"] - frozen["_replicates"]
    point = np.asarray(live["excess"]) - np.asarray(frozen["excess"])
    return {"excess_gap": point.tolist(), "excess_gap_ci": percentile_ci(diff).as_array().tolist()}


def causal_statistics(seq_kl: np.ndarray, seq_change: np.ndarray, seq_tokens: np.ndarray, write_layer: Sequence[int],
                      reader_layer: Sequence[int], n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Mean-ablation effects, live and frozen, with bootstrap CIs over sequences.

    seq_kl ``[S, 2, W]`` (mode live/frozen, write) and seq_change ``[S, 2, W, R]``: per-sequence sums over
    tokens (positions >= 1) of the KL and of the relative reader change; seq_tokens ``[S]``. Means are
    ratios of sums. By distance ``d = layer(reader) - layer(write)`` (>= 1), the change is averaged over
    the (write, reader) pairs at ``d``. ``division_share = 1 - frozen / live`` of the pooled sums (KL:
    summed over writes; change: over all pairs, and per distance), over the writes whose sums are finite in
    both modes (``pooled_writes``; an ablation whose logits overflow has NaN sums).
    """
    kl = np.asarray(seq_kl, dtype=np.float64)
    ch = np.asarray(seq_change, dtype=np.float64)
    tok = np.asarray(seq_tokens, dtype=np.float64)
    wl = np.asarray(write_layer, dtype=float)
    rl = np.asarray(reader_layer, dtype=float)
    dist = rl[None, :] - wl[:, None]  # [W, R]
    finite = np.isfinite(kl.sum(0)).all(0) & np.isfinite(ch.sum(0)).all((0, 2))  # [W]: both modes finite
    later = (dist >= 1) & finite[:, None]
    distances = sorted({int(d) for d in dist[later]})

    def summarise(kl_m: np.ndarray, ch_m: np.ndarray) -> dict[str, np.ndarray]:
        # kl_m [..., 2, W], ch_m [..., 2, W, R] (means over tokens)
        by_d = np.stack([np.where(later & (dist == d), ch_m, 0.0).sum((-1, -2)) / max((later & (dist == d)).sum(), 1)
                         for d in distances], -1) if distances else np.zeros(ch_m.shape[:-2] + (0,))
        pooled = np.where(later, ch_m, 0.0).sum((-1, -2))
        kl_f = np.where(finite, kl_m, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"kl": kl_m, "change": ch_m, "change_by_distance": by_d,
                    "kl_division_share": 1.0 - kl_f[..., 1, :].sum(-1) / kl_f[..., 0, :].sum(-1),
                    "change_division_share": 1.0 - pooled[..., 1] / pooled[..., 0],
                    "change_division_share_by_distance": 1.0 - by_d[..., 1, :] / by_d[..., 0, :]}

    n_tok = tok.sum()
    point = summarise(kl.sum(0) / n_tok, ch.sum(0) / n_tok)
    reps: dict[str, list] = {k: [] for k in point}
    for counts in resample_counts(len(tok), n_boot, seed):
        den = counts @ tok
        kl_b = np.einsum("bs,s...->b...", counts, kl) / den[:, None, None]
        ch_b = np.einsum("bs,s...->b...", counts, ch) / den[:, None, None, None]
        for k, v in summarise(kl_b, ch_b).items():
            reps[k].append(v)
    out: dict[str, Any] = {"distance": distances, "pooled_writes": finite.tolist()}
    for k, v in point.items():
        out[k] = np.asarray(v).tolist()
        out[k + "_ci"] = percentile_ci(np.concatenate(reps[k])).as_array().tolist()
    by_d = np.asarray(point["change_by_distance"])
    out["change_slope"] = {mode: loglinear_slope(distances, by_d[i]) if distances else math.nan
                           for i, mode in enumerate(MODES)}
    return out


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
@dataclass
class HorizonResult(ResultProtocol):
    """Per-sequence sums of the horizon curves and of the causal check (see the module docstring).

    seq_tokens ``[S]`` predictions per evaluation sequence; seq_clean ``[S]`` clean cross-entropy sums;
    seq_loss ``[S, 2, H]`` horizon cross-entropy sums (live, frozen); seq_kl_tokens ``[S]`` tokens in the
    KL means; seq_kl ``[S, 2, W]`` and seq_change ``[S, 2, W, R]`` the causal check's sums.
    """

    kind: ClassVar[str] = "horizon"

    model: str
    n_layers: int
    normalization: str
    ln_free: bool
    norm_placement: str
    horizons: list[int]
    n_calib: int
    seq_tokens: np.ndarray
    seq_clean: np.ndarray
    seq_loss: np.ndarray
    causal_writes: list[str] = field(default_factory=list)
    causal_write_layer: list[int] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    reader_layer: list[int] = field(default_factory=list)
    seq_kl_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    seq_kl: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 0)))
    seq_change: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 0, 0)))
    nonfinite_loss: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), dtype=np.int64))
    nonfinite_kl: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), dtype=np.int64))
    data_source: str = ""
    seconds: float = float("nan")
    n_boot: int = DEFAULT_N_BOOT
    seed: int = 0
    _doc: Optional[dict] = field(default=None, repr=False)

    @property
    def n_eval(self) -> int:
        return int(len(self.seq_tokens))

    def statistics(self) -> dict[str, Any]:
        if self._doc is None:
            curves = {mode: curve_statistics(self.seq_clean, self.seq_loss[:, i], self.seq_tokens, self.horizons,
                                             self.n_boot, self.seed) for i, mode in enumerate(MODES)}
            gap = gap_statistics(curves["live"], curves["frozen"])
            for c in curves.values():
                c.pop("_replicates")
            causal = None
            if self.causal_writes:
                causal = causal_statistics(self.seq_kl, self.seq_change, self.seq_kl_tokens, self.causal_write_layer,
                                           self.reader_layer, self.n_boot, self.seed)
                causal.update(writes=list(self.causal_writes), write_layer=list(self.causal_write_layer),
                              readers=list(self.readers), reader_layer=list(self.reader_layer),
                              n_tokens=int(self.seq_kl_tokens.sum()))
            self._doc = {"curves": curves, "gap": gap, "causal": causal}
        return self._doc

    def to_json(self) -> dict[str, Any]:
        st = self.statistics()
        live, frozen = st["curves"]["live"], st["curves"]["frozen"]
        doc = {
            "model": self.model, "n_layers": self.n_layers, "normalization": self.normalization,
            "ln_free": self.ln_free, "norm_placement": self.norm_placement, "horizons": list(self.horizons),
            "n_calib_seqs": self.n_calib, "n_eval_seqs": self.n_eval, "n_predictions": int(self.seq_tokens.sum()),
            "tokens": "next-token predictions at positions >= 1 of the evaluation sequences (target a real token); "
                      "means over the calibration sequences' tokens at positions >= 1; position 0 never ablated",
            "clean_loss": live["clean"], "clean_loss_ci": live["clean_ci"],
            "live": {k: v for k, v in live.items() if k not in ("clean", "clean_ci")},
            "frozen": {k: v for k, v in frozen.items() if k not in ("clean", "clean_ci")},
            "gap": st["gap"], "causal": st["causal"],
            "nonfinite": {"predictions": {m: self.nonfinite_loss[i].tolist() for i, m in enumerate(MODES)},
                          "kl_tokens": {m: self.nonfinite_kl[i].tolist() for i, m in enumerate(MODES)},
                          "meaning": "tokens whose ablated logits overflowed (inf/NaN), per horizon / causal write; "
                                     "their loss or KL is NaN"},
            "data_source": self.data_source, "seconds": self.seconds,
            "n_boot": self.n_boot, "seed": self.seed, "ci": "95 % percentile bootstrap over evaluation sequences",
        }
        return json_safe(doc)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"seq_tokens": self.seq_tokens, "seq_clean": self.seq_clean, "seq_loss": self.seq_loss,
                "seq_kl_tokens": self.seq_kl_tokens, "seq_kl": self.seq_kl, "seq_change": self.seq_change,
                "nonfinite_loss": self.nonfinite_loss, "nonfinite_kl": self.nonfinite_kl}

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "HorizonResult":
        causal = doc.get("causal") or {}
        return cls(model=doc["model"], n_layers=int(doc["n_layers"]), normalization=doc["normalization"],
                   ln_free=bool(doc["ln_free"]), norm_placement=doc["norm_placement"],
                   horizons=[int(h) for h in doc["horizons"]], n_calib=int(doc["n_calib_seqs"]),
                   seq_tokens=arrays["seq_tokens"], seq_clean=arrays["seq_clean"], seq_loss=arrays["seq_loss"],
                   causal_writes=list(causal.get("writes", [])),
                   causal_write_layer=[int(x) for x in causal.get("write_layer", [])],
                   readers=list(causal.get("readers", [])),
                   reader_layer=[int(x) for x in causal.get("reader_layer", [])],
                   seq_kl_tokens=arrays["seq_kl_tokens"], seq_kl=arrays["seq_kl"], seq_change=arrays["seq_change"],
                   nonfinite_loss=arrays["nonfinite_loss"], nonfinite_kl=arrays["nonfinite_kl"],
                   data_source=doc.get("data_source", ""), seconds=float(doc.get("seconds") or float("nan")),
                   n_boot=int(doc.get("n_boot", DEFAULT_N_BOOT)), seed=int(doc.get("seed", 0)))

    def frame_rows(self) -> Iterable[dict[str, Any]]:
        doc = self.to_json()
        yield {"model": self.model, "site": "clean", "layer": self.n_layers, "statistic": "loss",
               "value": doc["clean_loss"]}
        for mode in MODES:
            cur = doc[mode]
            for n, loss, exc in zip(self.horizons, cur["loss"], cur["excess"]):
                yield {"model": self.model, "site": f"horizon_{mode}", "layer": n, "statistic": "loss", "value": loss}
                yield {"model": self.model, "site": f"horizon_{mode}", "layer": n, "statistic": "excess", "value": exc}
            for key, h in cur["horizon"].items():
                yield {"model": self.model, "site": f"horizon_{mode}", "layer": None, "statistic": f"within_{key}",
                       "value": h["value"]}
        causal = doc["causal"]
        if causal:
            for w, lab in enumerate(causal["writes"]):
                for m, mode in enumerate(MODES):
                    yield {"model": self.model, "site": lab, "layer": causal["write_layer"][w],
                           "statistic": f"final_kl_{mode}", "value": causal["kl"][m][w]}

    def summary(self) -> str:
        doc = self.to_json()
        parts = [f"{self.model}: clean loss {_ci(doc['clean_loss'], doc['clean_loss_ci'])} over "
                 f"{doc['n_predictions']} predictions ({self.n_eval} sequences)"]
        for mode in MODES:
            hs = doc[mode]["horizon"]
            parts.append(f"  horizon ({mode} scales): " + ", ".join(
                f"within {k}: {fmt_number(v['value'], 'g')} [{fmt_number(v['ci'][0], 'g')}, "
                f"{fmt_number(v['ci'][1], 'g')}]" for k, v in hs.items()))
        return "\n".join(parts)

    def text(self) -> str:
        return format_horizon(self.to_json())


def _ci(x: Any, ci: Any, spec: str = ".4f") -> str:
    lo, hi = (ci or [None, None])[:2]
    return f"{fmt_number(x, spec)} [{fmt_number(lo, spec)}, {fmt_number(hi, spec)}]"


def format_horizon(doc: dict[str, Any]) -> str:
    """The horizon document as text: the loss curves, the horizons, the causal check."""
    lines = [f"{doc['model']}: effective layer horizon ({doc['n_layers']} layers, {doc['normalization']}, "
             f"placement {doc['norm_placement']})",
             f"clean loss {_ci(doc['clean_loss'], doc['clean_loss_ci'])} nats over {doc['n_predictions']} predictions "
             f"({doc['n_eval_seqs']} evaluation sequences; means from {doc['n_calib_seqs']} calibration sequences)", ""]
    rows = []
    for i, n in enumerate(doc["horizons"]):
        rows.append([str(n)] + [_ci(doc[m]["loss"][i], doc[m]["loss_ci"][i]) for m in MODES]
                    + [_ci(100 * (doc[m]["excess"][i] or 0) if doc[m]["excess"][i] is not None else None,
                           [None if v is None else 100 * v for v in doc[m]["excess_ci"][i]], "+.2f") for m in MODES]
                    + [_ci(None if doc["gap"]["excess_gap"][i] is None else 100 * doc["gap"]["excess_gap"][i],
                           [None if v is None else 100 * v for v in doc["gap"]["excess_gap_ci"][i]], "+.2f")])
    lines += text_table(["n", "loss live", "loss frozen", "excess live %", "excess frozen %", "gap %"], rows)
    lines.append("")
    for m in MODES:
        lines.append(f"horizon ({m} scales): " + ", ".join(
            f"within {k} of clean: n = {fmt_number(v['value'], 'g')} [{fmt_number(v['ci'][0], '.3g')}, "
            f"{fmt_number(v['ci'][1], '.3g')}]" for k, v in doc[m]["horizon"].items()))
    bad = doc.get("nonfinite") or {}
    for m in MODES:
        counts = (bad.get("predictions") or {}).get(m) or []
        for n, c in zip(doc["horizons"], counts):
            if c:
                lines.append(f"note: n = {n} ({m} scales): logits overflow (inf/NaN) at {c} predictions; "
                             "loss undefined")
        for w, c in zip((doc.get("causal") or {}).get("writes", []), (bad.get("kl_tokens") or {}).get(m) or []):
            if c:
                lines.append(f"note: ablating {w} ({m} scales): logits overflow at {c} tokens; KL undefined, "
                             "left out of the pooled shares")
    causal = doc.get("causal")
    if causal:
        lines += ["", "causal check: mean-ablate one write; KL(clean || ablated) of the next-token distribution, "
                      "live and with every reader's scale frozen"]
        rows = [[w, str(causal["write_layer"][i]), _ci(causal["kl"][0][i], causal["kl_ci"][0][i], ".4g"),
                 _ci(causal["kl"][1][i], causal["kl_ci"][1][i], ".4g")] for i, w in enumerate(causal["writes"])]
        lines += text_table(["write", "depth", "KL live", "KL frozen"], rows)
        lines.append(f"division share of the KL (1 - frozen / live, summed over writes): "
                     f"{_ci(causal['kl_division_share'], causal['kl_division_share_ci'], '.3f')}")
        lines.append(f"division share of the readers' input change (all later pairs): "
                     f"{_ci(causal['change_division_share'], causal['change_division_share_ci'], '.3f')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# model plumbing
# ----------------------------------------------------------------------------------------------
def _tensors(batch: Any, model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tb = batch if isinstance(batch, TokenBatch) else as_token_batch(batch, model)
    return tb.tokens, tb.attention_mask.bool()


def _after_bos(mask: torch.Tensor) -> torch.Tensor:
    """Real tokens at positions >= 1."""
    valid = mask.clone()
    valid[:, 0] = False
    return valid


def _prediction_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, pos - 1]``: the prediction at position t (>= 1) of token t + 1 counts when both are real."""
    pred = mask[:, :-1] & mask[:, 1:]
    pred[:, 0] = False
    return pred


def split_calibration(n_seqs: int, n_calib: Optional[int] = None) -> int:
    """Number of calibration sequences: ``n_calib`` or ``ceil(CALIB_FRACTION n)``; at least one sequence is
    left to evaluate."""
    if n_seqs < 2:
        raise NormgrowthError(f"the horizon needs at least 2 sequences (calibration and evaluation), got {n_seqs}: "
                              "use more data or a larger --n-seqs.")
    k = int(math.ceil(CALIB_FRACTION * n_seqs)) if n_calib is None else int(n_calib)
    if not 1 <= k < n_seqs:
        raise NormgrowthError(f"calibration sequences must be between 1 and {n_seqs - 1}, got {k}.")
    return k


def stream_means(model: Any, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[n_layers, d]`` float64: the clean mean of ``resid_pre.b`` over real tokens at positions >= 1
    (row 0 holds the embedding's mean, unused by the horizon)."""
    n, d = model.n_layers, model.d_model
    sums = torch.zeros(n, d, dtype=torch.float64)
    state: dict[str, torch.Tensor] = {}

    def adder(b: int) -> Callable:
        def hook(x: torch.Tensor) -> None:
            sums[b] += x.float()[state["valid"].to(x.device)].double().sum(0).cpu()
        return hook

    count = 0
    with torch.inference_mode(), model.hooks([("resid_pre", b, adder(b)) for b in range(n)]):
        for _, tok, m in iter_batches(tokens, mask, batch_size):
            state["valid"] = _after_bos(m)
            count += int(state["valid"].sum())
            model.forward(tok, attention_mask=m, logits=False)
    return sums / max(count, 1)


class _Readers:
    """Hooks for one pass: the horizon's reader inputs, frozen scales, the clean scales' record."""

    def __init__(self, model: Any):
        self.model = model
        self.n = int(model.n_layers)
        self.scale_sites = [(site, b) for site in ("ln1_scale", "ln2_scale") if model.has_site(site)
                            for b in range(self.n)]
        self.scale_sites.append(("final_scale", None))

    def input_sites(self) -> list[str]:
        """Where each block's readers take the stream: their input norms' inputs (the MLP's own norm when it
        has one), or, without input norms (post placement), the attention's and MLP's raw inputs."""
        if self.model.input_norm:
            return ["ln1_in"] + (["ln2_in"] if self.model.mlp_norm else [])
        return ["attn_in", "mlp_in"]

    def record_scales(self, store: dict) -> list:
        def rec(key: tuple) -> Callable:
            def hook(s: torch.Tensor) -> None:
                store[key] = s.detach().clone()
            return hook
        return [(site, layer, rec((site, layer))) for site, layer in self.scale_sites]

    def freeze_scales(self, clean: dict) -> list:
        def put(key: tuple) -> Callable:
            def hook(s: torch.Tensor) -> torch.Tensor:
                return clean[key].to(device=s.device, dtype=s.dtype).clone()
            return hook
        return [(site, layer, put((site, layer))) for site, layer in self.scale_sites]

    def horizon(self, n: int, means: torch.Tensor) -> list:
        """Hooks replacing, in every reader's input, the stream older than its horizon by its mean."""
        pre: dict[int, torch.Tensor] = {}

        def keep(b: int) -> Callable:
            def hook(x: torch.Tensor) -> None:
                pre[b] = x
            return hook

        def reader(block: int) -> Callable:
            b = old_blocks(block, n)

            def hook(x: torch.Tensor) -> Optional[torch.Tensor]:
                if b == 0:
                    return None
                old = pre[b]
                out = x.clone()
                out[:, 1:] = x[:, 1:] - old[:, 1:] + means[b].to(device=x.device, dtype=x.dtype)
                return out
            return hook

        needed = sorted({old_blocks(L, n) for L in range(self.n + 1)} - {0})
        hooks = [("resid_pre", b, keep(b)) for b in needed]
        for site in self.input_sites():
            hooks += [(site, L, reader(L)) for L in range(self.n)]
        hooks.append(("final_in", None, reader(self.n)))
        return hooks


def _quiet_forward(model: Any, tok: torch.Tensor, m: torch.Tensor, hooks: list) -> torch.Tensor:
    """Logits (float32) of one pass with ``hooks`` (the bridge's warning about edited scales is silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model.hooks(hooks):
            return model.forward(tok, attention_mask=m).float()


def _ce_sums(logits: torch.Tensor, tok: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-sequence sums of ``-log p(token t+1)`` over the predictions ``pred`` ``[batch, pos - 1]`` (float64;
    NaN for a sequence with non-finite logits) and the number of such predictions."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, tok[:, 1:].to(logp.device)[..., None])[..., 0]
    nll = torch.where(pred.to(nll.device), nll, 0.0)
    return nll.double().sum(1).cpu(), int((~torch.isfinite(nll)).sum())


def horizon_clean_blocks(n: int) -> int:
    """Blocks a pass with horizon ``n`` computes exactly as the clean pass: ``0 .. n`` (block ``L``'s readers
    replace the stream entering block ``L - n``, nothing while ``L <= n``)."""
    return int(n) + 1


def write_clean_blocks(write_layer: int) -> int:
    """Blocks a pass that ablates a write at depth ``write_layer`` (:func:`normgrowth.deletion.stream_layout`:
    0 for the embedding, ``L + 1`` for block ``L``'s attn_out / mlp_out) computes exactly as the clean pass:
    the blocks before the write's own."""
    return max(0, int(write_layer) - 1)


def horizon_logits(model: Any, tokens: torch.Tensor, mask: torch.Tensor, n: int, means: torch.Tensor,
                   frozen: bool = False, clean_scales: Optional[dict] = None,
                   clean_blocks: Optional[dict] = None) -> torch.Tensor:
    """Logits of one pass with horizon ``n`` (live, or frozen at ``clean_scales`` from :func:`clean_pass`).
    ``clean_blocks`` (recorded by :func:`clean_pass` on the same tokens): blocks ``0 .. n``, which this pass
    computes exactly as the clean one, are replayed instead of computed (:meth:`LoadedModel.replay_blocks`)."""
    readers = _Readers(model)
    hooks = readers.horizon(n, means)
    if frozen:
        if clean_scales is None:
            raise ValueError("frozen scales need the clean scales of the same tokens (clean_pass)")
        hooks += readers.freeze_scales(clean_scales)
    with torch.inference_mode(), model.replay_blocks(clean_blocks, horizon_clean_blocks(n)):
        return _quiet_forward(model, tokens, mask, hooks)


def clean_pass(model: Any, tokens: torch.Tensor, mask: torch.Tensor, extra: Sequence = (),
               blocks: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
    """Clean logits and every reader's clean scale ``{(site, layer): [batch, pos, 1]}``; with ``blocks`` (a
    dict), each block's output is recorded there for later passes to replay (:meth:`LoadedModel.record_blocks`)."""
    scales: dict = {}
    record = model.record_blocks(blocks) if blocks is not None else contextlib.nullcontext()
    with torch.inference_mode(), record:
        logits = _quiet_forward(model, tokens, mask, _Readers(model).record_scales(scales) + list(extra))
    return logits, scales


def _causal_readers(model: Any, state: dict) -> list:
    """Hooks on every block input and the final stream: record ``N(x)`` (clean) or add up its relative change."""
    from .deletion import normalize_input

    eps = float(model.norm_eps)
    n = int(model.n_layers)
    sites = [("resid_pre", L, ("ln1_scale", L)) for L in range(n)] + [("final_in", None, ("final_scale", None))]

    def hook(r: int, scale_key: tuple) -> Callable:
        def fn(x: torch.Tensor) -> None:
            divides = r == n or bool(model.input_norm)
            if state["mode"] == "clean":
                state["clean"][r] = normalize_input(x, model.centers, eps) if divides else x.float()
                return
            if not divides:
                normed = x.float()
            elif state["mode"] == "frozen":
                p = x.float() - x.float().mean(-1, keepdim=True) if model.centers else x.float()
                normed = p / state["scales"][scale_key].float().to(p.device)
            else:
                normed = normalize_input(x, model.centers, eps)
            ref = state["clean"][r]
            rel = (normed - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            state["change"][:, r] += torch.where(state["valid"].to(rel.device), rel, 0.0).double().sum(1).cpu()
        return fn

    return [(site, layer, hook(r, key)) for r, (site, layer, key) in enumerate(sites)]


def collect_horizon(model: Any, batch: Any, horizons: Any = None, causal_writes: Any = "default",
                    n_calib: Optional[int] = None, batch_size: int = 4,
                    progress: Optional[Callable[[int, int], None]] = None, n_boot: int = DEFAULT_N_BOOT,
                    seed: int = 0, reuse_clean_blocks: bool = True) -> HorizonResult:
    """Loss(n) live and frozen for every horizon of the grid, and the causal check, on ``batch``.

    The first ``n_calib`` sequences give the means, the rest are evaluated. ``causal_writes``: None or
    ``"none"`` for no causal check, ``"default"`` for :data:`DEFAULT_CAUSAL_WRITES` writes spread over
    depth, or labels for :func:`normgrowth.deletion.parse_ablate`. Passes per evaluation batch: one
    clean, two per horizon below ``n_layers`` (``n = n_layers`` ablates nothing: its loss is the clean
    pass's), two per causal write. With ``reuse_clean_blocks`` each of these passes replays, instead of
    computing, the leading blocks it shares with the clean pass of the same batch (:func:`horizon_clean_blocks`,
    :func:`write_clean_blocks`): the live results are bitwise the same, the frozen ones agree to float32
    rounding (the replayed prefix is the clean pass's, not recomputed through the frozen-scale hooks); the
    recorded outputs hold one ``[batch, pos, d_model]`` tensor per block.
    """
    from .deletion import _ablation_hooks, _write_means, parse_ablate, stream_layout

    started = time.perf_counter()
    tokens, mask = _tensors(batch, model)
    n_layers = int(model.n_layers)
    grid = parse_horizons(horizons, n_layers)
    k = split_calibration(tokens.shape[0], n_calib)
    cal_tok, cal_mask, ev_tok, ev_mask = tokens[:k], mask[:k], tokens[k:], mask[k:]
    if ev_tok.shape[1] < 3 or not bool(_prediction_mask(ev_mask).any()):
        raise NormgrowthError("the evaluation sequences have no prediction after position 0: use sequences of at "
                              "least 3 tokens.")
    layout = stream_layout(n_layers)
    labels = _causal_labels(model, causal_writes, parse_ablate)
    wl = [layout.write_layer[layout.writes.index(lab)] for lab in labels]
    means = stream_means(model, cal_tok, cal_mask, batch_size)
    write_means = _write_means(model, cal_tok, cal_mask, labels, batch_size) if labels else {}
    n_eval, H, W, R = ev_tok.shape[0], len(grid), len(labels), n_layers + 1
    seq_tokens = np.zeros(n_eval)
    seq_clean = np.zeros(n_eval)
    seq_loss = np.zeros((n_eval, 2, H))
    seq_kl_tokens = np.zeros(n_eval)
    seq_kl = np.zeros((n_eval, 2, W))
    seq_change = np.zeros((n_eval, 2, W, R))
    nonfinite_loss = np.zeros((2, H), dtype=np.int64)
    nonfinite_kl = np.zeros((2, W), dtype=np.int64)
    readers = _Readers(model)
    state: dict[str, Any] = {}
    causal_hooks = _causal_readers(model, state) if labels else []
    for start, tok, m in iter_batches(ev_tok, ev_mask, batch_size):
        stop = start + tok.shape[0]
        pred = _prediction_mask(m)
        valid = _after_bos(m)
        state.update(mode="clean", clean={}, valid=valid)
        blocks: Optional[dict] = {} if reuse_clean_blocks else None
        logits, scales = clean_pass(model, tok, m, causal_hooks, blocks=blocks)
        clean_sum, bad = _ce_sums(logits, tok, pred)
        if bad:
            raise NormgrowthError(f"the clean model's logits are not finite at {bad} predictions: check the "
                                  "model's dtype (use --dtype float32).")
        seq_tokens[start:stop] = pred.sum(1).numpy()
        seq_clean[start:stop] = clean_sum.numpy()
        for h, n in enumerate(grid):
            if n >= n_layers:
                seq_loss[start:stop, :, h] = clean_sum.numpy()[:, None]
                continue
            for i, frozen in enumerate((False, True)):
                lg = horizon_logits(model, tok, m, n, means, frozen=frozen, clean_scales=scales,
                                    clean_blocks=blocks)
                sums, bad = _ce_sums(lg, tok, pred)
                seq_loss[start:stop, i, h] = sums.numpy()
                nonfinite_loss[i, h] += bad
        if labels:
            clean_logp = torch.log_softmax(logits, -1)
            seq_kl_tokens[start:stop] = valid.sum(1).numpy()
            state["scales"] = scales
            for w, lab in enumerate(labels):
                for i, mode in enumerate(MODES):
                    state.update(mode=mode, change=torch.zeros(tok.shape[0], R, dtype=torch.float64))
                    hooks = causal_hooks + _ablation_hooks(model, lab, write_means[lab])
                    if mode == "frozen":
                        hooks += readers.freeze_scales(scales)
                    with torch.inference_mode(), model.replay_blocks(blocks, write_clean_blocks(wl[w])):
                        logp = torch.log_softmax(_quiet_forward(model, tok, m, hooks), -1)
                    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
                    kl = torch.where(valid.to(kl.device), kl, 0.0)
                    nonfinite_kl[i, w] += int((~torch.isfinite(kl)).sum())
                    seq_kl[start:stop, i, w] = kl.double().sum(1).cpu().numpy()
                    seq_change[start:stop, i, w] = state["change"].numpy()
        if progress is not None:
            progress(stop, n_eval)
    return HorizonResult(
        model=str(model.spec), n_layers=n_layers, normalization=str(model.normalization), ln_free=bool(model.ln_free),
        norm_placement=str(model.norm_placement), horizons=grid, n_calib=k, seq_tokens=seq_tokens,
        seq_clean=seq_clean, seq_loss=seq_loss, causal_writes=list(labels), causal_write_layer=wl,
        readers=list(layout.readers), reader_layer=list(layout.reader_layer), seq_kl_tokens=seq_kl_tokens,
        seq_kl=seq_kl, seq_change=seq_change, nonfinite_loss=nonfinite_loss, nonfinite_kl=nonfinite_kl,
        data_source=str(getattr(batch, "source", "")), seconds=time.perf_counter() - started, n_boot=n_boot, seed=seed)


def default_causal_writes(n_layers: int, n_writes: int = DEFAULT_CAUSAL_WRITES) -> list[str]:
    """About ``n_writes`` writes spread over depth: the embedding, then attn_out / mlp_out alternating over
    evenly spaced blocks."""
    from .deletion import stream_layout

    writes = stream_layout(n_layers).writes
    idx = sorted({int(round(x)) for x in np.linspace(0, len(writes) - 2, min(n_writes, len(writes) - 1))})
    return [writes[i] for i in idx]


def _causal_labels(model: Any, causal_writes: Any, parse_ablate: Callable) -> list[str]:
    if causal_writes is None or causal_writes is False or (isinstance(causal_writes, str)
                                                           and causal_writes.strip().lower() in ("none", "")):
        return []
    if isinstance(causal_writes, str) and causal_writes.strip().lower() == "default":
        return default_causal_writes(model.n_layers)
    text = causal_writes if isinstance(causal_writes, str) else ",".join(str(w) for w in causal_writes)
    return parse_ablate(text, model)
