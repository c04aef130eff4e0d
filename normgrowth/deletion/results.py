"""The deletion result (:class:`DeletionResults`), its JSON document and its text report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from ..errors import NormgrowthError
from ..numerics import DEFAULT_N_BOOT
from ..protocol import ResultProtocol
from ..storage import json_safe
from ..numerics import MIN_BOOT_SEQS
from ..tables import fmt_number, with_ci
from .estimators import (MATRICES, MIN_PAIRS, StreamLayout, _ci_array, _ci_pair, _growth_over_depth,
                         distance_matrix, locality, pair_average_by_distance, stream_layout, summarize_deletion)
from .reads import ERASED_BELOW, FAR_DISTANCE, FRONT_LOADED_MIN, deletion_verdict



def _read_document(summ: dict[str, Any]) -> dict[str, Any]:
    """``read``, ``read_no_growth``, the new ``locality`` keys, ``magnitude_share``, ``innovation_retention``
    and ``front_loaded`` (:mod:`normgrowth.deletion.reads`)."""
    point, cis, des, rdes = summ["point"], summ["ci"], summ["design"], summ["read_design"]
    lay = des.layout
    out: dict[str, Any] = {}

    def val_ci(key: str, index: Any = ()) -> tuple[Any, list]:
        v = point.get(key)
        return (None if v is None else np.asarray(v)[index]), _ci_pair(cis.get(key), index)

    has_read = "matrix.read" in point
    out["read_readers"] = list(rdes.readers)
    out["read_reader_k"] = list(rdes.reader_k)
    out["read"] = point["matrix.read"] if has_read else None
    out["read_no_growth"] = point["matrix.read_no_growth"] if has_read else None
    out["read_distance"] = rdes.distance if has_read else None
    loc: dict[str, Any] = {"fit": "per write over the block reader sublayers (not the unembedding); pooled with "
                                  "weights ||w_c||^2 as a ratio of sums; slopes of log I per layer of distance",
                           "n_writes": int(rdes.fit_writes.sum())}
    share: dict[str, Any] = {}
    if has_read:
        loc["slope"], loc["slope_ci95"] = val_ci("read.locality_slope")
        loc["magnitude_slope"], loc["magnitude_slope_ci95"] = val_ci("read.magnitude_slope")
        share["value"], share["value_ci95"] = val_ci("read.magnitude_share")
        loc["slope_equal_weights"], loc["slope_equal_weights_ci95"] = val_ci("read.locality_slope_equal_weights")
        share["equal_weights"], share["equal_weights_ci95"] = val_ci("read.magnitude_share_equal_weights")
        d = rdes.curve_d
        by = {"distance": d, "read": point["read.curve_read"], "read_no_growth": point["read.curve_read_no_growth"],
              "share": point["read.curve_share"]}
        for key in ("read", "read_no_growth", "share"):
            by[key + "_ci95"] = _ci_array(cis.get(f"read.curve_{key}"), (len(d),))
        loc["by_distance"] = {k: by[k] for k in ("distance", "read", "read_ci95", "read_no_growth",
                                                 "read_no_growth_ci95")}
        share["by_distance"] = {"distance": d, "share": by["share"], "share_ci95": by["share_ci95"]}
        per = []
        for c, w in enumerate(lay.writes):
            row: dict[str, Any] = {"write": w, "in_fit": bool(rdes.fit_writes[c]), "weight": summ["raw_energy"][c]}
            for key, name in (("read.write_locality_slope", "locality_slope"),
                              ("read.write_magnitude_slope", "magnitude_slope")):
                row[name], row[name + "_ci95"] = val_ci(key, c)
            per.append(row)
        loc["per_write"] = per
    else:
        loc.update(slope=None, slope_ci95=[None, None], magnitude_slope=None, magnitude_slope_ci95=[None, None])
        share.update(value=None, value_ci95=[None, None])
    share["definition"] = "pooled magnitude slope / pooled locality slope (slopes of log(I/I0) and log I)"
    out["locality_fit"] = loc
    out["magnitude_share"] = share
    ir: dict[str, Any] = {}
    ir["pooled"], ir["pooled_ci95"] = val_ci("retention.innovation_weighted")
    ir["pooled_write_weighted"], ir["pooled_write_weighted_ci95"] = val_ci("retention.write_weighted")
    ir["median"], ir["median_ci95"] = val_ci("retention.median")
    ir["share_below"], ir["share_below_ci95"] = val_ci("retention.share_below")
    ir["below"] = ERASED_BELOW
    ir["far_distance"] = FAR_DISTANCE
    ir["n_writes"] = int(rdes.retention_writes.sum())
    ir["no_innovation_writes"] = [w for w, z in zip(lay.writes, rdes.no_innovation) if z]
    ir["n_no_innovation"] = len(ir["no_innovation_writes"])
    ir["matrix"] = point["matrix.innovation_retention"]
    per = []
    for c, w in enumerate(lay.writes):
        row = {"write": w, "in_pool": bool(rdes.retention_writes[c])}
        row["retention"], row["retention_ci95"] = val_ci("retention.write_retention", c)
        row["innovation_share"], row["innovation_share_ci95"] = val_ci("innovation_share", c)
        per.append(row)
    ir["per_write"] = per
    out["innovation_retention"] = ir
    fs, fs_ci = val_ci("front_share")
    out["front_loaded"] = {"share": fs, "share_ci95": fs_ci, "writes": [w for w, f in zip(lay.writes, rdes.front) if f],
                           "min": FRONT_LOADED_MIN}
    return out


def deletion_document(summ: dict[str, Any]) -> dict[str, Any]:
    """The JSON body (everything but the run metadata) from :func:`summarize_deletion`'s output."""
    point, cis, des = summ["point"], summ["ci"], summ["design"]
    lay = des.layout
    sel = summ["summary_writes"]
    out: dict[str, Any] = {}
    for q in MATRICES:
        out[q] = point[f"matrix.{q}"]
    dists, _, n_pairs = pair_average_by_distance(point["matrix.retention"], des.distance, des.curve_pairs)
    by: dict[str, Any] = {"distance": dists, "n_pairs": n_pairs, "used": n_pairs >= MIN_PAIRS,
                          "pairs": "attn_out / mlp_out writes (not the embedding, not zero writes) x every reader"}
    for q in MATRICES:
        by[q] = point[f"curve.{q}"]
        by[q + "_ci95"] = _ci_array(cis.get(f"curve.{q}"), (len(dists),))
    for key in ("dilution_decay_per_layer", "visibility_decay_per_layer", "excess_dilution_decay_per_layer"):
        by[key] = point[key]
        by[key + "_ci95"] = _ci_pair(cis.get(key))
    by["retention_far"] = point["retention_far"]
    by["retention_far_ci95"] = _ci_pair(cis.get("retention_far"))
    by["n_far_pairs"] = int(des.far_pairs.sum())
    out["by_distance"] = by
    per_write = []
    for c, w in enumerate(lay.writes):
        row = {"write": w, "write_layer": lay.write_layer[c], "zero": bool(des.zero[c]),
               "in_summary": bool(sel[c]), "n_readers": int(np.isfinite(des.distance[:, c]).sum())}
        for k in ("dilution", "visibility", "excess_dilution"):
            s = point[f"write_slope.{k}"][c]
            row[f"{k}_decay_per_layer"] = math.exp(-s) if math.isfinite(s) else None
            ci = cis.get(f"write_slope.{k}")
            lo, hi = _ci_pair(ci, c)
            row[f"{k}_decay_per_layer_ci95"] = [math.exp(-hi) if hi is not None and math.isfinite(hi) else None,
                                                math.exp(-lo) if lo is not None and math.isfinite(lo) else None]
        row["retention_far"] = point["write_retention_far"][c]
        row["retention_far_ci95"] = _ci_pair(cis.get("write_retention_far"), c)
        per_write.append(row)
    out["per_write"] = per_write
    out["zero_writes"] = [w for w, z in zip(lay.writes, des.zero) if z]
    out["locality"] = locality(point["matrix.reading"], point["matrix.reading_null"], des.distance,
                               influence=point["matrix.influence"])
    reads = _read_document(summ)
    out["locality"].update(reads.pop("locality_fit"))
    out.update(reads)
    ir, loc_new, share = out["innovation_retention"], out["locality"], out["magnitude_share"]
    out["verdict"] = deletion_verdict(ir["pooled_ci95"], loc_new["slope_ci95"], share["value_ci95"],
                                      out["front_loaded"]["share"])
    out["verdict"]["evidence"] = {
        "innovation_retention": {"value": ir["pooled"], "ci95": ir["pooled_ci95"]},
        "locality_slope": {"value": loc_new["slope"], "ci95": loc_new["slope_ci95"]},
        "magnitude_share": {"value": share["value"], "ci95": share["value_ci95"]},
        "front_share": {"value": out["front_loaded"]["share"], "ci95": out["front_loaded"]["share_ci95"]}}
    parts = summ["parts"]
    depth = list(lay.reader_layer)
    centred_ci = cis.get("stream_centred_rms")
    out["stream_parts"] = {
        "readers": list(lay.readers), "reader_layer": depth,
        "rms_total": parts["total"], "rms_shared": parts["shared"], "rms_centred": parts["centred"],
        "rms_centred_ci95": _ci_array(centred_ci, (len(depth),)),
        "growth_per_layer": {k: _growth_over_depth(depth, parts[k]) for k in ("total", "shared", "centred")},
        "definition": "E||P(r_L)||^2 = ||mu_L||^2 + E||P(r_L) - mu_L||^2 over tokens at positions >= 1; "
                      "RMS norms; growth = exp(slope) of log RMS on reader depth",
    }
    # replicates that gave NaN where the full-sample estimate is finite (structurally undefined cells, such as
    # the slope of a write with one reader, are NaN in every replicate and are not counted)
    nonfinite = {k: int(np.max(np.where(np.isfinite(point[k]), np.asarray(ci.n_nonfinite), 0), initial=0))
                 for k, ci in cis.items()}
    warnings_ = []
    if summ["n_seqs"] < MIN_BOOT_SEQS:
        warnings_.append(f"only {summ['n_seqs']} sequences feed the bootstrap (fewer than {MIN_BOOT_SEQS}): "
                         "its CIs are unreliable")
    bad = {k: v for k, v in nonfinite.items() if v}
    if bad:
        worst = max(bad, key=bad.get)
        warnings_.append(f"{len(bad)} bootstrapped statistics had replicates that gave NaN (at most "
                         f"{bad[worst]} of {summ['n_boot']}, in {worst}); they are left out of the CIs and counted")
    if out["zero_writes"]:
        warnings_.append(f"{len(out['zero_writes'])} write(s) are zero once token-centred and are skipped: "
                         + ", ".join(out["zero_writes"]))
    out["bootstrap"] = {"n_boot": summ["n_boot"], "n_seqs": summ["n_seqs"], "nonfinite_replicates": nonfinite,
                        "min_seqs": MIN_BOOT_SEQS}
    out["warnings"] = warnings_
    return out


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
@dataclass(repr=False)
class DeletionResults(ResultProtocol):
    """Streamed deletion sums of one model on one data set (positions >= 1, padding excluded).

    ``seq_gram[s]``: ``sum_t <w~_i, w~_j>`` over sequence ``s``'s tokens (token-centred projected
    writes, ``[C, C]``); ``seq_infl[s, r, c]`` / ``seq_fnorm[s, r]``: sums of ``||N(r_L) - N(r_L - w~_c)||``
    and ``||N(r_L)||``; ``mean_gram``: ``<mu_i, mu_j>`` of the write means; ``seq_read[s, L, c]`` /
    ``seq_read0[s, L, c]``: the reads ``I`` and ``I0`` of the reader sublayers ``read_readers`` (``read_reader_k``
    writes before each). Every statistic is a function of these sums (:func:`summarize_deletion`). ``shards``:
    the sequences ``[lo, hi)`` each rank collected (one block in a single process).
    """

    kind = "deletion"

    model: str
    ln_free: bool
    normalization: str
    centers: bool
    n_layers: int
    d_model: int
    norm_eps: float
    layout: StreamLayout
    seq_gram: np.ndarray
    seq_n_tokens: np.ndarray
    seq_infl: np.ndarray
    seq_fnorm: np.ndarray
    mean_gram: np.ndarray
    max_write_sum_rel_error: float  # max over tokens/readers of ||sum of writes - stream|| / ||stream||
    data_source: str = ""
    ablation: Optional[dict] = None
    n_boot: int = DEFAULT_N_BOOT
    seed: int = 0
    norm_placement: str = "pre"  # "post": block readers see the raw stream (see reader_normalises)
    parallel_blocks: bool = False
    seq_read: Optional[np.ndarray] = None
    seq_read0: Optional[np.ndarray] = None
    read_readers: tuple = ()
    read_reader_k: tuple = ()
    read_token_stride: int = 1  # the reads sum over positions p with (p - 1) % stride == 0
    shards: Optional[list] = None
    _doc: Optional[dict] = field(default=None, repr=False)

    @property
    def n_seqs(self) -> int:
        return int(self.seq_gram.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(np.sum(self.seq_n_tokens))

    def statistics(self) -> dict[str, Any]:
        """:func:`summarize_deletion` of the stored sums."""
        return summarize_deletion(self.seq_gram, self.seq_n_tokens, self.seq_infl, self.seq_fnorm, self.mean_gram,
                                  self.layout, n_boot=self.n_boot, seed=self.seed, seq_read=self.seq_read,
                                  seq_read0=self.seq_read0, readers=self.read_readers, reader_k=self.read_reader_k)

    @property
    def mean(self) -> dict[str, np.ndarray]:
        """Ratio-of-sums matrices ``{quantity: [n_readers, n_writes]}`` (NaN where undefined)."""
        doc = self.to_json()
        return {q: np.array(doc[q], dtype=float) for q in MATRICES}

    def to_json(self) -> dict:
        if self._doc is None:
            lay = self.layout
            out: dict[str, Any] = {
                "model": self.model, "ln_free": bool(self.ln_free), "normalization": self.normalization,
                "centers": bool(self.centers), "norm_placement": self.norm_placement,
                "parallel_blocks": bool(self.parallel_blocks),
                "n_layers": self.n_layers, "d_model": self.d_model,
                "norm_eps": self.norm_eps, "n_seqs": self.n_seqs, "n_tokens": self.n_tokens,
                "data_source": self.data_source, "max_write_sum_rel_error": self.max_write_sum_rel_error,
                "writes": list(lay.writes), "write_layer": list(lay.write_layer),
                "readers": list(lay.readers), "reader_layer": list(lay.reader_layer),
                "n_boot_requested": self.n_boot, "seed": self.seed,
                "estimator": "ratio of sums over tokens (positions >= 1) of token-centred projected writes; reads "
                             "I(c, L) of every reader sublayer; innovation retention",
                "shards": self.shards or [[0, self.n_seqs]],
                "read_token_stride": int(self.read_token_stride),
                "shared_component": {"write_mean_norm": np.sqrt(np.clip(np.diag(self.mean_gram), 0, None))},
            }
            out.update(deletion_document(self.statistics()))
            if self.ln_free:
                out["verdict"]["note"] = ("LN-free model: nothing divides by the stream's size, so I = I0 and the "
                                          "magnitude share is 0 by construction")
            elif self.norm_placement == "post":
                out["verdict"]["note"] = ("output-only normalisation: the block sublayers read the raw stream, so "
                                          "I = I0 there and the magnitude share is 0 by construction")
            out["ablation"] = self.ablation if self.ablation is not None else {
                "writes": [], "distance": [], "normalized_input_change": [], "final_kl": [], "run": False}
            self._doc = json_safe(out)
        return self._doc

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"seq_gram": self.seq_gram, "seq_n_tokens": np.asarray(self.seq_n_tokens), "seq_infl": self.seq_infl,
               "seq_fnorm": self.seq_fnorm, "mean_gram": self.mean_gram}
        if self.seq_read is not None:
            out.update(seq_read=self.seq_read, seq_read0=self.seq_read0)
        return out

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> "DeletionResults":
        boot = doc.get("bootstrap") or {}
        return cls(model=doc["model"], ln_free=bool(doc["ln_free"]), normalization=doc["normalization"],
                   centers=bool(doc["centers"]), n_layers=int(doc["n_layers"]), d_model=int(doc["d_model"]),
                   norm_eps=float(doc["norm_eps"]), layout=stream_layout(int(doc["n_layers"])),
                   seq_gram=arrays["seq_gram"], seq_n_tokens=arrays["seq_n_tokens"], seq_infl=arrays["seq_infl"],
                   seq_fnorm=arrays["seq_fnorm"], mean_gram=arrays["mean_gram"],
                   max_write_sum_rel_error=float(doc.get("max_write_sum_rel_error") or 0.0),
                   data_source=doc.get("data_source", ""), norm_placement=str(doc.get("norm_placement", "pre")),
                   parallel_blocks=bool(doc.get("parallel_blocks", False)),
                   ablation=doc.get("ablation") if (doc.get("ablation") or {}).get("writes") else None,
                   n_boot=int(doc.get("n_boot_requested", boot.get("n_boot", DEFAULT_N_BOOT))),
                   seed=int(doc.get("seed", 0)), seq_read=arrays.get("seq_read"), seq_read0=arrays.get("seq_read0"),
                   read_readers=tuple(doc.get("read_readers") or ()),
                   read_reader_k=tuple(doc.get("read_reader_k") or ()),
                   shards=doc.get("shards"), read_token_stride=int(doc.get("read_token_stride", 1)))

    def frame_rows(self) -> Iterable[dict[str, Any]]:
        return deletion_frame_rows(self.to_json())

    def text(self) -> str:
        """The plain-text report (:func:`format_deletion_json` of :meth:`to_json`)."""
        return format_deletion_json(self.to_json())

    def summary(self) -> str:
        doc = self.to_json()
        v = doc["verdict"]
        flags = f" (flags: {', '.join(v['flags'])})" if v["flags"] else ""
        return (f"deletion of {self.model}: {v['label']}{flags} ({self.n_seqs} sequences, {self.n_tokens} tokens)\n"
                + "\n".join(f"{name.replace('_', ' ')}: {_with_ci(value, ci)}"
                            for name, (value, ci) in _pooled(doc).items()))


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".3f") -> str:
    return fmt_number(x, spec, missing="-")


def _with_ci(x: Any, ci: Any, spec: str = ".3f") -> str:
    """:func:`normgrowth.tables.with_ci` with the deletion tables' mark for a missing number."""
    return with_ci(x, ci, spec, missing="-")


def _pooled(doc: dict) -> dict[str, tuple[Any, Any]]:
    """The pooled numbers behind the verdict: ``{name: (value, ci95)}``."""
    ir, loc, share, front = doc["innovation_retention"], doc["locality"], doc["magnitude_share"], doc["front_loaded"]
    return {"locality_slope": (loc.get("slope"), loc.get("slope_ci95")),
            "magnitude_slope": (loc.get("magnitude_slope"), loc.get("magnitude_slope_ci95")),
            "magnitude_share": (share.get("value"), share.get("value_ci95")),
            "innovation_retention": (ir["pooled"], ir["pooled_ci95"]),
            "innovation_retention_write_weighted": (ir["pooled_write_weighted"], ir["pooled_write_weighted_ci95"]),
            "innovation_retention_median": (ir["median"], ir["median_ci95"]),
            "innovation_retention_share_below": (ir["share_below"], ir["share_below_ci95"]),
            "front_share": (front["share"], front["share_ci95"])}


def format_deletion_report(res: DeletionResults) -> str:
    """Plain-text report: verdict with its evidence, distance table, per-write decay, locality, ablation."""
    return res.text()


def format_deletion_json(doc: dict) -> str:
    """The report of :func:`format_deletion_report` from a :meth:`DeletionResults.to_json` document."""
    if "verdict" not in doc or "innovation_retention" not in doc:
        raise NormgrowthError(f"the deletion result for {doc.get('model', '?')!r} was computed by an older normgrowth "
                              "(no verdict): delete the cached file and run `normgrowth deletion` again.")
    by, loc, v = doc["by_distance"], doc["locality"], doc["verdict"]
    kind = "LN-free" if doc.get("ln_free") else doc.get("normalization", "")
    centred = "centred" if doc.get("centers", True) else "uncentred"
    err = doc.get("max_write_sum_rel_error")
    boot = doc.get("bootstrap", {})
    lines = [f"deletion analysis: {doc['model']} ({kind}, P = {centred} writes), {doc.get('n_layers', '?')} layers, "
             f"{doc.get('n_seqs', '?')} sequences, {doc.get('n_tokens', '?')} tokens (position 0 and padding excluded)",
             "estimators: ratios of sums over tokens of token-centred writes; 95% CIs by bootstrap over sequences "
             f"({boot.get('n_boot', 0)} resamples)"]
    if err is not None:
        lines.append(f"check: the writes sum to every reader's stream within {err:.1e} (relative)")
    for w in doc.get("warnings", []):
        lines.append(f"warning: {w}")
    th = v["thresholds"]
    ir, lo_, sh, fr = doc["innovation_retention"], doc["locality"], doc["magnitude_share"], doc["front_loaded"]
    lines += ["", f"VERDICT: {v['label']} - {v['reason']}" + (f" ({v['note']})" if v.get("note") else ""),
              f"  flags: {', '.join(v['flags']) if v['flags'] else 'none'}",
              f"  locality slope (d log I / d layer, {lo_.get('n_writes', '?')} writes pooled with ||w||^2 weights): "
              f"{_with_ci(lo_.get('slope'), lo_.get('slope_ci95'), '.4f')}  (locality if the CI is below 0)",
              "  magnitude slope (d log(I/I0) / d layer): "
              f"{_with_ci(lo_.get('magnitude_slope'), lo_.get('magnitude_slope_ci95'), '.4f')}",
              f"  magnitude share: {_with_ci(sh.get('value'), sh.get('value_ci95'))}  (magnitude if the CI is above "
              f"{th['share_split']}, direction if below)",
              "  weighting sensitivity, every write alike: locality slope "
              f"{_with_ci(lo_.get('slope_equal_weights'), lo_.get('slope_equal_weights_ci95'), '.4f')}, magnitude share "
              f"{_with_ci(sh.get('equal_weights'), sh.get('equal_weights_ci95'))}",
              f"  innovation retention at d >= {th['far_distance']} ({ir['n_writes']} writes, ||u||^2 weights): "
              f"{_with_ci(ir['pooled'], ir['pooled_ci95'])}  (erasure below {th['erased_below']}, reinforced above "
              f"{th['reinforced_above']}); ||w||^2 weights "
              f"{_with_ci(ir['pooled_write_weighted'], ir['pooled_write_weighted_ci95'])}, "
              f"median {_with_ci(ir['median'], ir['median_ci95'])}, share below {ir['below']} "
              f"{_with_ci(ir['share_below'], ir['share_below_ci95'])}; writes without innovation: "
              f"{ir['n_no_innovation']}"
              + (f" ({', '.join(ir['no_innovation_writes'])})" if ir["no_innovation_writes"] else ""),
              f"  front share (embedding + block 0 of the last reader's squared input): "
              f"{_with_ci(fr['share'], fr['share_ci95'])}  (front-loaded at >= {fr['min']})"]
    if int(doc.get("read_token_stride") or 1) > 1:
        lines.append(f"  reads I, I0 summed over every {doc['read_token_stride']}th position (1, "
                     f"{1 + doc['read_token_stride']}, ...): a fixed token subsample")
    bd = lo_.get("by_distance")
    if bd:
        lines += ["", "reads by distance (layers): sum_c I(c, c+d) / sum_c I(c, c+1/2), the same for I0, and the "
                  "magnitude share by distance",
                  f"{'d':>5}  {'read I':<26}{'no growth I0':<26}{'share':<26}"]
        sb = sh["by_distance"]
        for i, d in enumerate(bd["distance"]):
            lines.append(f"{d:>5.1f}  {_with_ci(bd['read'][i], bd['read_ci95'][i], '.4g'):<26}"
                         f"{_with_ci(bd['read_no_growth'][i], bd['read_no_growth_ci95'][i], '.4g'):<26}"
                         f"{_with_ci(sb['share'][i], sb['share_ci95'][i]):<26}")
    lines += ["",
              "by distance d = layer(reader) - layer(write); mean over the (reader, attn/MLP write) pairs at that "
              "distance; * = fewer than 3 pairs (not pooled)",
              f"{'d':>3} {'pairs':>5}  {'retention rho':<24}{'dilution delta':<24}{'null delta0':<24}"
              f"{'excess delta/delta0':<24}{'influence I':<24}"]
    cols = ("retention", "dilution", "dilution_null", "excess_dilution", "influence")
    n_d = len(by["distance"])
    for i, d in enumerate(by["distance"]):
        cells = [_with_ci(by[q][i], (by.get(q + "_ci95") or [[None, None]] * n_d)[i]) for q in cols]
        star = "" if by["used"][i] else "*"
        lines.append(f"{int(d):>3} {str(by['n_pairs'][i]) + star:>5}  " + "".join(f"{c:<24}" for c in cells))
    lines += ["",
              "decay per layer of distance, fitted per write (log-linear over the write's readers), mean slope over "
              "attn/MLP writes (> 1 = falls):",
              f"  dilution          {_with_ci(by.get('dilution_decay_per_layer'), by.get('dilution_decay_per_layer_ci95'), '.4f')}",
              f"  visibility        {_with_ci(by.get('visibility_decay_per_layer'), by.get('visibility_decay_per_layer_ci95'), '.4f')}",
              f"  excess dilution   {_with_ci(by.get('excess_dilution_decay_per_layer'), by.get('excess_dilution_decay_per_layer_ci95'), '.4f')}",
              "", f"{'write':<12}{'readers':>8}  {'retention d>=2':<24}{'dilution decay':<24}{'excess decay':<24}"]
    for row in doc.get("per_write", []):
        if row["zero"]:
            lines.append(f"{row['write']:<12}{row['n_readers']:>8}  (zero once token-centred: skipped)")
            continue
        tag = "" if row["in_summary"] else "  (not in the mean)"
        lines.append(f"{row['write']:<12}{row['n_readers']:>8}  {_with_ci(row['retention_far'], row['retention_far_ci95']):<24}"
                     f"{_with_ci(row['dilution_decay_per_layer'], row['dilution_decay_per_layer_ci95'], '.4f'):<24}"
                     f"{_with_ci(row['excess_dilution_decay_per_layer'], row['excess_dilution_decay_per_layer_ci95'], '.4f'):<24}"
                     + tag)
    if doc.get("ln_free"):
        lines.append("note: this model is LN-free: nothing divides by the stream's size, so dilution does not reduce "
                     "a write's effect here (see docs/deletion.md)")
    parts = doc.get("stream_parts")
    if parts:
        g = parts["growth_per_layer"]
        lines += ["", "which part of the stream grows (RMS of P(r) at each reader = shared token mean + the rest): "
                  f"growth per layer total {_f(g['total'], '.4f')}, shared {_f(g['shared'], '.4f')}, "
                  f"centred {_f(g['centred'], '.4f')}",
                  f"{'reader':<14}{'total':>10}{'shared':>10}{'centred':>10}"]
        for i, name in enumerate(parts["readers"]):
            lines.append(f"{name:<14}{_f(parts['rms_total'][i], '.4g'):>10}{_f(parts['rms_shared'][i], '.4g'):>10}"
                         f"{_f(parts['rms_centred'][i], '.4g'):>10}")
    per = loc.get("share_within_per_reader", {})
    lines += ["", "locality: mean distance of what each reader reads: reading shares R, equal-norm null R0, direct "
              "influence I; share of R within k layers",
              f"{'reader':<14}{'R':>8}{'R0':>8}{'I':>8}" + "".join(f"{'<=' + k:>8}" for k in per)]
    readers = doc.get("readers", [str(i) for i in range(len(loc["mean_distance"]))])
    infl_md = loc.get("mean_distance_influence", [None] * len(readers))
    for r, name in enumerate(readers):
        lines.append(f"{name:<14}{_f(loc['mean_distance'][r], '.2f'):>8}{_f(loc['mean_distance_null'][r], '.2f'):>8}"
                     f"{_f(infl_md[r], '.2f'):>8}" + "".join(f"{_f(v[r]):>8}" for v in per.values()))
    null_within = loc.get("share_within_null", {})
    infl_within = loc.get("share_within_influence", {})
    lines.append("share within k layers (mean over readers with writes farther than k): "
                 + ", ".join(f"k={k}: R {_f(v)}, R0 {_f(null_within.get(k))}, I {_f(infl_within.get(k))}"
                             for k, v in loc["share_within"].items()))
    ab = doc.get("ablation")
    if ab and ab.get("writes"):
        lines += ["", "causal check: mean-ablate one write (all positions but 0); relative change of the normalised "
                  "input at the reader d layers later (total effect), and mean KL(clean || ablated) of the next-token "
                  "distribution",
                  f"{'write':<12}" + "".join(f"{'d=' + str(d):>9}" for d in ab["distance"]) + f"{'KL':>11}"]
        for i, w in enumerate(ab["writes"]):
            lines.append(f"{w:<12}" + "".join(f"{_f(x):>9}" for x in ab["normalized_input_change"][i])
                         + f"{_f(ab['final_kl'][i], '.4g'):>11}")
    return "\n".join(lines)


def deletion_frame_rows(doc: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Long-format rows of a deletion JSON (``DeletionResults.to_json()``): every ratio-of-sums matrix entry and
    every read (``site`` the write, extra columns ``reader`` and ``distance``), then the pooled statistics
    (by-distance decays and the verdict's quantities) with their CIs."""
    model = doc.get("model")
    dist = distance_matrix(doc["write_layer"], doc["reader_layer"])
    for q in MATRICES:
        for r, reader in enumerate(doc["readers"]):
            for c, write in enumerate(doc["writes"]):
                v = doc[q][r][c] if q in doc else None
                if v is not None:
                    yield {"model": model, "site": write, "layer": doc["reader_layer"][r], "statistic": q,
                           "value": float(v), "reader": reader, "distance": float(dist[r, c])}
    by = doc.get("by_distance") or {}
    for key in ("retention_far", "dilution_decay_per_layer", "visibility_decay_per_layer",
                "excess_dilution_decay_per_layer"):
        if key in by:
            lo, hi = by.get(key + "_ci95") or [None, None]
            yield {"model": model, "site": "all writes", "layer": None, "statistic": key, "value": by[key],
                   "ci_lo": lo, "ci_hi": hi}
    for q in ("read", "read_no_growth"):
        for r, reader in enumerate(doc.get("read_readers") or []):
            for c, write in enumerate(doc["writes"]):
                v = doc[q][r][c]
                if v is not None:
                    yield {"model": model, "site": write, "layer": None, "statistic": q, "value": float(v),
                           "reader": reader, "distance": float(doc["read_distance"][r][c])}
    for name, (value, ci) in _pooled(doc).items():
        yield {"model": model, "site": "all writes", "layer": None, "statistic": name, "value": value,
               "ci_lo": ci[0], "ci_hi": ci[1]}
