"""The ``report`` document: collected statistics plus their growth fits, ratios and the Appendix-1 bound.

``report_document(results)`` is what ``normgrowth report --json`` writes and what ``compare`` and the
figure scripts read. On top of :meth:`Results.to_json` it adds:

* ``fit``: a :class:`~normgrowth.fit.GrowthFit` per site (log-linear fit of the token-weighted mean of the
  per-sequence curves; 95 % CI by bootstrap over sequences);
* ``layer_ratios``: per site, norm[l] / norm[l-1] with bootstrap CIs;
* ``appendix1``: the study's bound g_l - 1 <= (||attn_out_l|| + ||mlp_out_l||) / ||resid_pre_l|| (means);
  None unless resid_pre, attn_out, mlp_out and resid_post were all collected;
* ``position``: mean ||x|| per position for resid_pre and resid_post (position 0 included; None for a
  site not collected), and the number of sequences reaching each position.

It also holds the report's per-layer text table (:func:`format_report_table`). Layering: this module and
:mod:`normgrowth.fit` sit above the collected statistics (:mod:`normgrowth.results`), which import no estimator.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .fit import GrowthFit, appendix1_bound, fit_growth, fit_site, layer_ratios, parse_window
from .numerics import DEFAULT_N_BOOT
from .results import SITES, Results, layout_text
APPENDIX1_SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")  # in appendix1_bound's argument order


def site_fits(res: Results, window: Optional[str] = None, seed: int = 0) -> dict[str, GrowthFit]:
    """``{site: fit_site(res, site, window, seed)}`` for every collected site (empty for a one-layer model)."""
    if res.meta.n_layers < 2:
        return {}
    win = parse_window(window, res.meta.n_layers) if window else None
    return {site: fit_site(res, site, win, seed) for site, st in res.sites.items() if st is not None}


POSITION_GROUPS = ("early", "middle", "late")


def position_groups(position_count: np.ndarray) -> dict[str, tuple[int, int]]:
    """Positions 1..P-1 that hold tokens, split into three contiguous groups of (nearly) equal length:
    ``{"early": (first, last), "middle": ..., "late": ...}`` (inclusive; groups with no position omitted)."""
    present = [p for p in range(1, len(position_count)) if position_count[p] > 0]
    out = {}
    for name, chunk in zip(POSITION_GROUPS, np.array_split(np.asarray(present, dtype=int), 3)):
        if chunk.size:
            out[name] = (int(chunk[0]), int(chunk[-1]))
    return out


def variant_fits(res: Results, window: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Growth fits of other summaries of each site's norm, beside the mean's (docs/fit.md, "Which part grows"):

    ``median`` (median ||x|| per layer), ``geometric_mean`` (exp of the mean of log ||x||; both robust to a
    few massive activations) and ``positions`` (the token-weighted mean norm over the early, middle and late
    thirds of positions >= 1, from the per-position means). Each is one curve, so its CI is the regression
    standard error over layers: it measures how well the law fits, not sampling over sequences.
    """
    if res.meta.n_layers < 2:
        return {}
    win = parse_window(window, res.meta.n_layers) if window else None
    groups = position_groups(res.position_count)
    out: dict[str, dict[str, Any]] = {}
    for site, st in res.sites.items():
        if st is None:
            continue
        entry: dict[str, Any] = {
            "median": fit_growth(st.median, window=win).to_json(),
            "geometric_mean": fit_growth(np.exp(st.log_mean), window=win).to_json(),
            "positions": {},
        }
        for name, (lo, hi) in groups.items():
            counts = res.position_count[lo:hi + 1].astype(float)
            curve = st.position_mean[:, lo:hi + 1] @ counts / counts.sum()
            entry["positions"][name] = {"positions": [lo, hi], **fit_growth(curve, window=win).to_json()}
        out[site] = entry
    return out


def report_document(res: Results, window: Optional[str] = None, fits: Optional[dict[str, GrowthFit]] = None
                    ) -> dict[str, Any]:
    doc = res.to_json()
    fits = site_fits(res, window) if fits is None else fits
    doc["fit"] = {site: f.to_json() for site, f in fits.items()}
    doc["fit_variants"] = variant_fits(res, window)
    ratios = {}
    if res.meta.n_layers >= 2:
        for site, st in res.sites.items():
            if st is None:
                continue
            ratio, lo, hi = layer_ratios(st.seq_mean, weights=res.seq_n_tokens, n_boot=DEFAULT_N_BOOT)
            ratios[site] = {"ratio": ratio, "ci95_lo": lo, "ci95_hi": hi}
    doc["layer_ratios"] = ratios
    s = {site: st for site, st in res.sites.items() if st is not None}
    if all(site in s for site in APPENDIX1_SITES):
        bound = appendix1_bound(*(s[site].mean for site in APPENDIX1_SITES))
        doc["appendix1"] = {k: np.asarray(v) for k, v in bound.items()}
    else:
        doc["appendix1"] = None
    doc["position"] = {site: s[site].position_mean if site in s else None for site in ("resid_pre", "resid_post")}
    doc["position_count"] = res.position_count
    doc["sites_order"] = list(SITES)
    return doc


def format_report_table(res: Results) -> str:
    """Per-layer table: mean norms per site, resid_post growth ratio to the previous layer, position-0 norm."""
    m = res.meta
    head = (f"model {m.model}  ({m.family}, {m.normalization}{', LN-free' if m.ln_free else ''}, {layout_text(m)}, "
            f"{m.n_layers} layers, d_model {m.d_model}, {m.dtype} on {m.device})\n"
            f"data {m.data_source}: {m.n_seqs} sequences, {m.n_tokens} tokens at positions >= 1 "
            f"(position 0 reported apart)\n"
            "mean L2 norm per layer; ratio = resid_post[l] / resid_post[l-1]; bos = resid_post at position 0\n")
    cols = [s for s in SITES]
    lines = [f"{'layer':>5} " + " ".join(f"{c:>11}" for c in cols) + f" {'ratio':>7} {'bos':>11}"]
    post = res.sites["resid_post"]
    for layer in range(m.n_layers):
        cells = []
        for c in cols:
            st = res.sites.get(c)
            cells.append(f"{st.mean[layer]:>11.4g}" if st is not None else f"{'-':>11}")
        ratio = f"{post.mean[layer] / post.mean[layer - 1]:>7.4f}" if post is not None and layer > 0 else f"{'':>7}"
        bos = f"{post.bos_mean[layer]:>11.4g}" if post is not None else f"{'-':>11}"
        lines.append(f"{layer:>5} " + " ".join(cells) + f" {ratio} {bos}")
    missing = [s for s, st in res.sites.items() if st is None]
    foot = f"\n(no {', '.join(missing)} in this architecture: reported as missing)" if missing else ""
    return head + "\n".join(lines) + foot
