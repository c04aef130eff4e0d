"""Do the weights themselves grow with depth? Weight norms per layer, and layer gains on random inputs.

Two analyses, both documented formula by formula in ``docs/weights.md``:

* :func:`weight_norms` (no data): Frobenius norms of every layer's weights, with the preceding
  normalisation's gain folded into the matrices that read the normalised stream
  (``W_OV^h = diag(g1) W_V^h W_O^h``, ``diag(g2) W_in``), plus a growth fit of each per-layer series.
* :func:`random_input_gains` (one forward pass): the norm of each attention and MLP output when the
  block's norms see seeded random vectors instead of the stream; :func:`compare_gains` sets them
  next to the real outputs from a collected :class:`~normgrowth.results.Results`.

:func:`analyse_weights` runs both and returns a :class:`WeightsResult` (the weights.json document, saved and
loaded through the result protocol); :func:`format_weights` prints it.

The math lives in small pure functions on tensors (``effective_gain``, ``folded_ov_norms``,
``folded_frobenius``); the model plumbing calls them layer by layer. The random-input pass lives in
:mod:`normgrowth.random_gains` (its names are importable from here too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

from .errors import NormgrowthError
from .models import norm_eps_of
from .protocol import ResultProtocol
from .random_gains import (RANDOM_SITES, StdSpec, _random_seed, compare_gains,  # noqa: F401  (re-exported)
                           comparison_to_json, format_gain_table, input_std_from_results, random_input_gains,
                           random_sites, random_token_ids, standardised_normal)
from .storage import as_float
from .tables import fmt_number, text_table

# Per-layer scalar series of WeightNorms, in table order (W_OV_heads is the per-head list).
LAYER_KEYS: tuple[str, ...] = ("W_Q", "W_K", "W_V", "W_O", "b_V", "b_O", "W_in", "W_gate", "W_out", "b_in", "b_out",
                               "W_router", "gain_attn", "gain_mlp", "gain_attn_out", "gain_mlp_out")
# Per-expert series of mixture-of-experts MLPs ([layer][expert]) and the shared expert's ([layer]).
EXPERT_KEYS: tuple[str, ...] = ("W_in", "W_gate", "W_out")
SHARED_EXPERT_KEYS: tuple[str, ...] = ("W_in_shared", "W_gate_shared", "W_out_shared", "W_shared_gate")
# Series that get a growth fit: the head mean of ||W_OV^h|| first, then every scalar series.
FIT_SERIES: tuple[str, ...] = ("W_OV_mean",) + LAYER_KEYS

# ----------------------------------------------------------------------------------------------
# pure math
# ----------------------------------------------------------------------------------------------
def effective_gain(gain_stored: torch.Tensor, eps: float, ln_free: bool) -> torch.Tensor:
    """The gain that multiplies the normalised input: ``g`` for LN/RMS, ``g_stored / sqrt(eps)`` LN-free.

    An LN-free norm computes ``(x - mean) * g_stored / sqrt(var + eps) + b`` with ``var << eps``,
    i.e. ``(x - mean) * g_eff + b`` with ``g_eff = g_stored / sqrt(eps)`` (``= g_orig / sigma_avg``
    for the published format, whose ``g_stored = g_orig * sqrt(eps) / sigma_avg``).
    """
    g = gain_stored.to(torch.float64)
    return g / math.sqrt(eps) if ln_free else g


def frobenius(t: Optional[torch.Tensor]) -> Optional[float]:
    """``||t||_F = sqrt(sum t_ij^2)`` accumulated in float64; ``None`` for a missing tensor."""
    if t is None:
        return None
    return float(torch.linalg.vector_norm(t.detach().to(torch.float64)))


def folded_frobenius(gain: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[float]:
    """``||diag(gain) W||_F`` for ``W`` of shape ``[d_model, n]`` (rows read the normalised stream)."""
    if weight is None:
        return None
    w = weight.detach().to(torch.float64)
    return float(torch.linalg.vector_norm(gain.to(w.device, torch.float64)[:, None] * w))


def folded_ov_norms(gain: torch.Tensor, W_V: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """``||diag(gain) W_V^h W_O^h||_F`` per head, float64 ``[n_heads]``.

    ``W_V`` is ``[n_heads, d_model, d_head]`` (query heads; K/V already repeated for GQA), ``W_O``
    ``[n_heads, d_head, d_model]``. With ``A = diag(gain) W_V^h`` and ``B = W_O^h``,
    ``||A B||_F^2 = sum_ij (A^T A)_ij (B B^T)_ij``: two ``d_head x d_head`` Gram matrices instead of
    a ``d_model x d_model`` product per head.
    """
    a = gain.to(W_V.device, torch.float64)[None, :, None] * W_V.detach().to(torch.float64)
    b = W_O.detach().to(torch.float64)
    gram_a = torch.einsum("hdi,hdj->hij", a, a)
    gram_b = torch.einsum("hid,hjd->hij", b, b)
    sq = (gram_a * gram_b).sum(dim=(1, 2))
    return sq.clamp_min(0.0).sqrt().cpu()


# ----------------------------------------------------------------------------------------------
# weight norms
# ----------------------------------------------------------------------------------------------
@dataclass
class WeightNorms:
    """Per-layer weight norms of one model and the growth fit of each per-layer series."""

    model: str  # model spec as loaded
    ln_free: bool  # gains are the effective gains g_stored / sqrt(eps)
    normalization: str  # "LN", "RMS" or "none"
    W_OV_heads: np.ndarray  # [n_layers, n_heads]: ||diag(g1) W_V^h W_O^h||_F per query head
    layers: dict[str, list[Optional[float]]]  # LAYER_KEYS -> per-layer values (None: not in the checkpoint)
    gain_final: float  # ||g_f||_2 of the final norm (effective gain for LN-free)
    fit: dict[str, Any] = field(default_factory=dict)  # series -> GrowthFit
    fit_skipped: dict[str, str] = field(default_factory=dict)  # series -> why it was not fitted
    # mixture-of-experts MLPs: EXPERT_KEYS -> [layer][expert], SHARED_EXPERT_KEYS -> [layer]; None for dense MLPs
    experts: Optional[dict[str, list]] = None
    norm_placement: str = "pre"  # ModelConfig.norm_placement: "pre" | "peri" | "post" | "none"
    parallel_blocks: bool = False
    source: Optional[dict] = None  # LoadedModel.source: for a GGUF file, its quantisation and the dequantised dtype

    @property
    def n_layers(self) -> int:
        return int(self.W_OV_heads.shape[0])

    def series(self, name: str) -> Optional[np.ndarray]:
        """Per-layer values of series ``name`` (``W_OV_mean`` or a LAYER_KEYS name); None if absent."""
        if name == "W_OV_mean":
            return self.W_OV_heads.mean(axis=1)
        values = self.layers[name]
        if any(v is None for v in values):
            return None
        return np.asarray(values, dtype=np.float64)

    def to_json(self) -> dict:
        layers = []
        for i in range(self.n_layers):
            row: dict[str, Any] = {"W_OV_heads": [float(x) for x in self.W_OV_heads[i]]}
            for key in LAYER_KEYS:
                v = self.layers[key][i]
                row[key] = None if v is None else float(v)
            layers.append(row)
        return {
            "layers": layers,
            "gain_final": float(self.gain_final),
            "fit": {name: f.to_json() for name, f in self.fit.items()},
            "fit_skipped": dict(self.fit_skipped),
            "model": self.model,
            "ln_free": bool(self.ln_free),
            "normalization": self.normalization,
            "experts": self.experts,
            "norm_placement": self.norm_placement,
            "parallel_blocks": bool(self.parallel_blocks),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], W_OV_heads: Optional[np.ndarray] = None) -> "WeightNorms":
        """Inverse of :meth:`to_json` (``W_OV_heads`` given exactly, e.g. from an npz, replaces the JSON's)."""
        from .fit import GrowthFit

        try:
            rows = doc["layers"]
            ov = (np.asarray(W_OV_heads, dtype=np.float64) if W_OV_heads is not None
                  else np.asarray([r["W_OV_heads"] for r in rows], dtype=np.float64).reshape(len(rows), -1))
            layers = {k: [None if r.get(k) is None else float(r[k]) for r in rows] for k in LAYER_KEYS}
            return cls(model=str(doc["model"]), ln_free=bool(doc["ln_free"]),
                       normalization=str(doc.get("normalization", "")), W_OV_heads=ov, layers=layers,
                       gain_final=as_float(doc.get("gain_final")),
                       fit={k: GrowthFit.from_json(v) for k, v in doc.get("fit", {}).items()},
                       fit_skipped=dict(doc.get("fit_skipped", {})), experts=doc.get("experts"),
                       norm_placement=str(doc.get("norm_placement", "pre")),
                       parallel_blocks=bool(doc.get("parallel_blocks", False)), source=doc.get("source"))
        except (KeyError, TypeError, ValueError) as err:
            raise NormgrowthError(f"weight-norm JSON is malformed ({type(err).__name__}: {err}); compute it again "
                                  "with normgrowth weights.") from None


def _layer_gains(model: Any, which: str, stored: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Effective gain vectors (float64) of the ``ln1``/``ln2``/``ln1_post``/``ln2_post``/``ln_final`` norms,
    one per module: ``effective_gain(offset + stored)`` (offset 1 for Gemma's ``1 + w`` norms, else 0);
    None per layer where the block has no such norm."""
    if stored is None:
        return [None] * model.n_layers
    mods = model.norm_modules(which)
    offset = float(getattr(model, "norm_gain_offset", 0.0))
    return [effective_gain(stored[i].to(torch.float64) + offset, norm_eps_of(mods[i]), model.ln_free)
            for i in range(stored.shape[0])]


def check_finite_gains(model: Any) -> None:
    """Raise when a normalisation gain is inf/NaN (an LN-free checkpoint's 1e6-scaled gains overflow float16)."""
    for which in ("ln1", "ln2", "ln1_post", "ln2_post", "ln_final"):
        for i, mod in enumerate(model.norm_modules(which)):
            w = getattr(mod, "weight", None)
            if w is not None and not bool(torch.isfinite(w.detach()).all()):
                hint = (" (LN-free gains are stored x1e6 and overflow float16: load it in float32 or bfloat16)"
                        if model.ln_free or model.norm_eps >= 1e6 else "")
                raise NormgrowthError(f"the {which} gain of {model.spec!r} (module {i}) is not finite{hint}; "
                                      "reload the model in float32.")


def weight_norms(model: Any, window: Any = None) -> WeightNorms:
    """Frobenius norms of every layer's weights (norm gains folded in) and their growth fits.

    Per layer ``l`` (``g1``/``g2`` the effective gains of the attention's / MLP's input norm; a vector
    of ones where the sublayer reads the raw stream, OLMo 2):
    ``W_OV_heads[h] = ||diag(g1) W_V^h W_O^h||_F`` (query head h reads K/V head
    ``h // (n_heads // n_kv_heads)``); ``W_Q, W_K, W_V, W_O`` = Frobenius norm of the whole layer's
    raw matrix (stored K/V heads for GQA); ``b_V`` the stored value bias; ``W_in = ||diag(g2) W_in||_F``,
    ``W_gate`` likewise (gated MLPs); for mixture-of-experts MLPs ``W_in``, ``W_gate``, ``W_out`` are the
    means over experts of each expert's norm (each expert in ``experts``) and
    ``W_router = ||diag(g2) W_router||_F``; ``W_out``, ``b_O``, ``b_in``, ``b_out`` raw (None when the
    checkpoint has no such weight); ``gain_attn = ||g1||``, ``gain_mlp = ||g2||`` (None without input
    norms); ``gain_attn_out``, ``gain_mlp_out`` = ``||g||`` of the output norms (peri / post placement,
    else None). Every series is fitted with ``fit_growth(series, window)``; a series with a missing
    or zero value is skipped.
    """
    check_finite_gains(model)
    sw = model.stacked_weights()
    n_layers = model.n_layers
    g1 = _layer_gains(model, "ln1", sw["ln1_w"])
    g2 = _layer_gains(model, "ln2", sw["ln2_w"])
    g1_out = _layer_gains(model, "ln1_post", sw["ln1_post_w"])
    g2_out = _layer_gains(model, "ln2_post", sw["ln2_post_w"])
    gf = _layer_gains(model, "ln_final", sw["lnf_w"])[0]
    ones = torch.ones(model.d_model, dtype=torch.float64)
    ew = model.expert_weights() if getattr(model, "moe", False) else None

    ov = np.zeros((n_layers, model.n_heads), dtype=np.float64)
    layers: dict[str, list[Optional[float]]] = {k: [] for k in LAYER_KEYS}
    experts: Optional[dict[str, list]] = None
    norm_placement: str = "pre"  # ModelConfig.norm_placement: "pre" | "peri" | "post" | "none"
    parallel_blocks: bool = False
    if ew is not None:
        experts = {k: [] for k in EXPERT_KEYS}
        experts.update({k: [] for k in SHARED_EXPERT_KEYS if ew[k] is not None})

    def at(key: str, l: int) -> Optional[torch.Tensor]:
        t = sw.get(key)
        return None if t is None else t[l]

    with torch.no_grad():
        for l in range(n_layers):
            a_gain = g1[l] if g1[l] is not None else ones
            m_gain = g2[l] if g2[l] is not None else ones
            ov[l] = folded_ov_norms(a_gain, sw["W_V"][l], sw["W_O"][l]).numpy()
            layers["W_Q"].append(frobenius(at("W_Q", l)))
            layers["W_K"].append(frobenius(at("W_K_stored", l)))
            layers["W_V"].append(frobenius(at("W_V_stored", l)))
            layers["W_O"].append(frobenius(at("W_O", l)))
            layers["b_V"].append(frobenius(at("b_V", l)))
            layers["b_O"].append(frobenius(at("b_O", l)))
            if ew is None:
                layers["W_in"].append(folded_frobenius(m_gain, at("W_in", l)))
                layers["W_gate"].append(folded_frobenius(m_gain, at("W_gate", l)))
                layers["W_out"].append(frobenius(at("W_out", l)))
                layers["W_router"].append(None)
            else:
                per = {"W_in": [folded_frobenius(m_gain, w) for w in ew["W_in"][l]],
                       "W_gate": [folded_frobenius(m_gain, w) for w in ew["W_gate"][l]],
                       "W_out": [frobenius(w) for w in ew["W_out"][l]]}
                for key, values in per.items():
                    experts[key].append(values)
                    layers[key].append(float(np.mean(values)))
                layers["W_router"].append(folded_frobenius(m_gain, ew["W_router"][l]))
                for key in SHARED_EXPERT_KEYS:
                    if ew[key] is not None:
                        w = ew[key][l]
                        experts[key].append(frobenius(w) if key == "W_out_shared" else folded_frobenius(m_gain, w))
            layers["b_in"].append(frobenius(at("b_in", l)))
            layers["b_out"].append(frobenius(at("b_out", l)))
            layers["gain_attn"].append(frobenius(g1[l]))
            layers["gain_mlp"].append(frobenius(g2[l]))
            layers["gain_attn_out"].append(frobenius(g1_out[l]))
            layers["gain_mlp_out"].append(frobenius(g2_out[l]))

    wn = WeightNorms(model=str(model.spec), ln_free=bool(model.ln_free), normalization=str(model.normalization),
                     W_OV_heads=ov, layers=layers, gain_final=float(frobenius(gf)), experts=experts,
                     norm_placement=str(model.norm_placement), parallel_blocks=bool(model.parallel_blocks),
                     source=getattr(model, "source", None))
    wn.fit, wn.fit_skipped = fit_series({name: wn.series(name) for name in FIT_SERIES}, window)
    return wn


def fit_series(series: Mapping[str, Optional[np.ndarray]], window: Any = None
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """``fit_growth`` on each single per-layer curve; returns (fits, {skipped series: reason}).

    A series is skipped (not fitted) when it is absent (None: the checkpoint has no such weight),
    has a zero value (log-linear fit impossible) or a non-finite value.
    """
    from .fit import fit_growth

    fits: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, values in series.items():
        if values is None:
            skipped[name] = "not in this checkpoint"
            continue
        arr = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            skipped[name] = "has a non-finite value"
            continue
        if np.any(arr <= 0):
            skipped[name] = "has a zero value (no log-linear fit)"
            continue
        try:
            fits[name] = fit_growth(arr, window)
        except NormgrowthError as err:
            skipped[name] = str(err)
    return fits, skipped


def _fmt(v: Optional[float]) -> str:
    """4 significant digits, scientific outside [1e-3, 1e5); "-" when missing."""
    x = as_float(v)
    return fmt_number(x, ".4g" if x == 0 or 1e-3 <= abs(x) < 1e5 else ".3e", missing="-")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join(text_table(header, rows))


def _fit_table(fits: Mapping[str, Any], skipped: Mapping[str, str]) -> str:
    from .fit import format_fit_table

    out = format_fit_table(dict(fits)) if fits else "(no series fitted)"
    if skipped:
        out += "\nnot fitted: " + "; ".join(f"{k} ({v})" for k, v in skipped.items())
    return out


def format_weight_table(wn: WeightNorms) -> str:
    """Per-layer table of the weight norms, then the growth-fit table (and the series not fitted)."""
    keys = [k for k in LAYER_KEYS if any(v is not None for v in wn.layers[k])]
    header = ["layer", "W_OV_mean", "W_OV_max"] + keys
    rows = []
    for l in range(wn.n_layers):
        rows.append([str(l), _fmt(float(wn.W_OV_heads[l].mean())), _fmt(float(wn.W_OV_heads[l].max()))]
                    + [_fmt(wn.layers[k][l]) for k in keys])
    gain_note = ("gains are effective gains g_stored/sqrt(eps) (LN-free)" if wn.ln_free
                 else "gains as stored")
    title = (f"weight norms of {wn.model} (Frobenius; W_OV, W_in, W_gate with their norm's gain folded in; "
             f"{gain_note}; final-norm gain {_fmt(wn.gain_final)})")
    from .sources import source_note

    note = source_note(wn.source)
    if note:
        title = note + "\n" + title
    return title + "\n" + _table(header, rows) + "\n\ngrowth fits per layer\n" + _fit_table(wn.fit, wn.fit_skipped)


# ----------------------------------------------------------------------------------------------
# the weights result (what ``normgrowth weights --json`` writes)
# ----------------------------------------------------------------------------------------------
@dataclass(repr=False)
class WeightsResult(ResultProtocol):
    """Weight norms of one model, optionally with its random-input gains and their comparison with real data.

    ``to_json()`` is the one weights.json layout (docs/weights.md)::

        {"model": str, "ln_free": bool, "normalization": str,
         "weights": WeightNorms.to_json(),
         "random_inputs": random_input_gains(...) or null,
         "comparison": comparison_to_json(compare_gains(...)) or null}
    """

    kind: ClassVar[str] = "weights"

    norms: WeightNorms
    random_inputs: Optional[dict] = None  # random_input_gains(...)
    comparison: Optional[dict] = None  # compare_gains(...): GrowthFit objects under "fit"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.norms.model, "ln_free": bool(self.norms.ln_free),
                "normalization": self.norms.normalization, "norm_placement": self.norms.norm_placement,
                "parallel_blocks": bool(self.norms.parallel_blocks), "weights": self.norms.to_json(),
                "random_inputs": self.random_inputs,
                "comparison": None if self.comparison is None else comparison_to_json(self.comparison)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"W_OV_heads": np.asarray(self.norms.W_OV_heads, dtype=np.float64)}

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "WeightsResult":
        from .fit import GrowthFit

        if not isinstance(doc.get("weights"), Mapping):
            raise NormgrowthError("saved weights result has no \"weights\" object (another layout): compute it "
                                  "again with normgrowth weights.")
        norms = WeightNorms.from_json(doc["weights"], arrays.get("W_OV_heads"))
        comparison = doc.get("comparison")
        if comparison is not None:
            comparison = dict(comparison)
            comparison["fit"] = {k: GrowthFit.from_json(v) for k, v in comparison.get("fit", {}).items()}
        return cls(norms=norms, random_inputs=doc.get("random_inputs"), comparison=comparison)

    def frame_rows(self) -> Iterator[dict[str, Any]]:
        """Long-format rows. Site ``attn`` / ``mlp``: the per-layer weight-norm series (statistic = series name,
        ``W_OV`` per head with a ``head`` column); site ``final_norm``: ``gain`` (layer None). Sites
        ``attn_out`` / ``mlp_out``: ``random_input_norm`` and, with real data, ``real_norm`` and
        ``real_to_random``; site ``mlp_pre``: ``random_act_rate`` / ``real_act_rate``."""
        wn = self.norms
        model = wn.model

        def rows(site: str, stat: str, values: Any, **extra: Any) -> Iterator[dict[str, Any]]:
            if values is None:
                return
            for layer, v in enumerate(values):
                yield {"model": model, "site": site, "layer": layer, "statistic": stat,
                       "value": as_float(v), **extra}

        for (layer, head), v in np.ndenumerate(wn.W_OV_heads):
            yield {"model": model, "site": "attn", "layer": int(layer), "statistic": "W_OV", "value": float(v),
                   "head": int(head)}
        yield from rows("attn", "W_OV_mean", wn.series("W_OV_mean"))
        for key in LAYER_KEYS:
            if any(v is not None for v in wn.layers[key]):
                yield from rows(_SERIES_SITE[key], key, wn.layers[key])
        yield {"model": model, "site": "final_norm", "layer": None, "statistic": "gain", "value": float(wn.gain_final)}
        for key, per_layer in (wn.experts or {}).items():
            for layer, values in enumerate(per_layer):
                if isinstance(values, list):
                    for e, v in enumerate(values):
                        yield {"model": model, "site": "mlp", "layer": layer, "statistic": f"expert_{key}",
                               "value": as_float(v), "expert": e}
                else:
                    yield {"model": model, "site": "mlp", "layer": layer, "statistic": key,
                           "value": as_float(values)}
        if self.random_inputs is not None:
            r = self.random_inputs
            yield from rows("attn_out", "random_input_norm", r["attn_out"])
            yield from rows("mlp_out", "random_input_norm", r["mlp_out"])
            yield from rows("mlp_pre", "random_act_rate", r["mlp_act_rate"])
        if self.comparison is not None:
            c = self.comparison
            yield from rows("attn_out", "real_norm", c["real_attn_out"])
            yield from rows("attn_out", "real_to_random", c["ratio_attn"])
            yield from rows("mlp_out", "real_norm", c["real_mlp_out"])
            yield from rows("mlp_out", "real_to_random", c["ratio_mlp"])
            yield from rows("mlp_pre", "real_act_rate", c["real_act_rate"])

    def summary(self) -> str:
        wn = self.norms
        lines = [f"weight norms of {wn.model} ({wn.n_layers} layers, {wn.normalization}"
                 f"{', LN-free' if wn.ln_free else ''})"]
        for name in ("W_OV_mean", "W_in", "W_out"):
            f = wn.fit.get(name)
            if f is not None:
                lo, hi = f.ci95
                lines.append(f"{name}: growth {f.growth_factor:.4g}/layer [95% CI {lo:.4g}, {hi:.4g}] over layers "
                             f"{f.window[0]}..{f.window[1]}")
        if self.comparison is not None:
            ratios = [v for v in self.comparison["ratio_attn"] + self.comparison["ratio_mlp"]
                      if v is not None and math.isfinite(v)]
            if ratios:
                lines.append(f"real / random-input output norms: {min(ratios):.3g} to {max(ratios):.3g}")
        elif self.random_inputs is not None:
            lines.append("random-input gains computed (no real data to compare with)")
        return "\n".join(lines)


_SERIES_SITE = {**{k: "attn" for k in ("W_Q", "W_K", "W_V", "W_O", "b_V", "b_O", "gain_attn", "gain_attn_out")},
                **{k: "mlp" for k in ("W_in", "W_gate", "W_out", "b_in", "b_out", "W_router", "gain_mlp",
                                      "gain_mlp_out")}}


def analyse_weights(model: Any, results: Any = None, random_inputs: bool = True, *, n_seqs: int, seq_len: int,
                    seed: int = 0, window: Any = None) -> WeightsResult:
    """Everything ``normgrowth weights MODEL`` reports: :func:`weight_norms`, and with ``random_inputs``
    :func:`random_input_gains` (``n_seqs`` x ``seq_len`` random tokens), compared with ``results`` (a
    collected :class:`~normgrowth.results.Results` of the same model) when given. With ``results`` of an
    LN-free model the random inputs get the real inputs' stds (:func:`input_std_from_results`)."""
    out = WeightsResult(norms=weight_norms(model, window))
    if random_inputs:
        std = input_std_from_results(results, model) if (results is not None and model.ln_free) else None
        out.random_inputs = random_input_gains(model, n_seqs=n_seqs, seq_len=seq_len, seed=seed, input_std=std)
        if results is not None:
            out.comparison = compare_gains(out.random_inputs, results, window)
    return out


def format_weights(result: WeightsResult) -> str:
    """The printable ``normgrowth weights`` report: weight table and fits, then the random-input gains."""
    text = format_weight_table(result.norms)
    if result.random_inputs is not None:
        source = result.random_inputs["input_std_source"]
        if result.comparison is not None:
            text += "\n\nrandom-input gains vs real (input std: " + source + ")\n" + format_gain_table(result.comparison)
        else:
            text += "\n\nrandom-input gains (input std: " + source + ")\n" + format_gain_table(result.random_inputs)
    return text
