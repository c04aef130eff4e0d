"""Growth laws (normgrowth.laws via fit_growth) against independent least squares and planted curves."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import optimize

from normgrowth.fit import GrowthFit, curvature_flag, fit_growth, format_fit_table
from normgrowth.laws import LAWS, NONE, UNDECIDED, compare_laws, format_law_table, law_curve, law_rate_text


def per_sequence(rng, curve, n_seqs, sigma, rho=0.7, sigma_seq=0.3):
    """x[s, l] = curve[l] exp(u_s + e[s, l]): per-sequence scale u_s and stationary AR(1) layer noise; token
    counts as weights."""
    n_layers = curve.size
    noise = np.empty((n_seqs, n_layers))
    noise[:, 0] = rng.normal(0, sigma, n_seqs)
    for j in range(1, n_layers):
        noise[:, j] = rho * noise[:, j - 1] + math.sqrt(1 - rho**2) * rng.normal(0, sigma, n_seqs)
    x = curve * np.exp(rng.normal(0, sigma_seq, (n_seqs, 1)) + noise)
    return x, rng.integers(20, 200, n_seqs).astype(float)


def scipy_log_fit(model, p0, layers, y):
    """The law fitted by scipy's least_squares on log residuals (an independent optimiser); returns (params, rss)."""
    res = optimize.least_squares(lambda p: np.log(y) - np.log(np.maximum(model(p, layers), 1e-300)), p0,
                                 xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=20000)
    return res.x, float(res.fun @ res.fun)


# ------------------------------------------------------------------------------------------------
# the fits themselves, against independent least squares
# ------------------------------------------------------------------------------------------------
def test_law_fits_match_independent_least_squares():
    layers = np.arange(3, 27, dtype=float)
    rng = np.random.default_rng(1)
    y_full = (np.arange(30) + 4.0) ** 1.5 * np.exp(rng.normal(0, 0.01, 30))
    y = y_full[3:27]
    fit = fit_growth(y_full, window=(3, 26)).law
    e = np.polyfit(layers, np.log(y), 1)
    assert fit.laws["exponential"]["params"]["growth_factor"] == pytest.approx(math.exp(e[0]), rel=1e-10)
    assert fit.laws["exponential"]["rss_log"] == pytest.approx(float(((np.log(y) - np.polyval(e, layers)) ** 2).sum()),
                                                                rel=1e-9)
    models = {
        "linear": (lambda p, x: p[0] + p[1] * x, [1.0, 5.0]),
        "power": (lambda p, x: p[0] * (x + p[2]) ** p[1], [1.0, 1.5, 4.0]),
        "saturating": (lambda p, x: p[0] - p[1] * np.exp(-(x - 3.0) / p[2]), [300.0, 250.0, 20.0]),
    }
    for law, (model, p0) in models.items():
        _, rss = scipy_log_fit(model, p0, layers, y)
        # the module's optimum is at least as good as scipy's from a sensible start, and not better by more than noise
        assert fit.laws[law]["rss_log"] <= rss * (1 + 1e-6) + 1e-15, law
    power = fit.laws["power"]["params"]
    assert power["exponent"] == pytest.approx(1.5, abs=0.15) and power["origin"] == pytest.approx(4.0, abs=1.5)
    # the reported curve is the fitted law
    for law in LAWS:
        params = fit.laws[law]["params"]
        log_fit = np.log(law_curve(law, params, layers))
        assert float(((np.log(y) - log_fit) ** 2).sum()) == pytest.approx(fit.laws[law]["rss_log"], rel=1e-6), law


def test_noise_free_planted_laws_recover_their_parameters():
    layers = np.arange(40, dtype=float)
    cases = {
        "power": ((layers + 4.0) ** 1.5 * 2.0, {"exponent": 1.5, "origin": 4.0, "amplitude": 2.0}),
        "saturating": (58.0 - 10.0 * np.exp(-layers / 8.0), {"asymptote": 58.0, "scale": 8.0}),
        "linear": (10.0 + 0.5 * layers, {"intercept": 10.0, "slope": 0.5, "relative_slope": 0.5 / (10 + 0.5 * 3)}),
        "exponential": (3.0 * 1.04**layers, {"growth_factor": 1.04, "amplitude": 3.0}),
    }
    for law, (curve, want) in cases.items():
        fit = fit_growth(curve, window=(3, 36)).law
        assert fit.laws[law]["rss_log"] < 1e-12, law
        for name, value in want.items():
            assert fit.laws[law]["params"][name] == pytest.approx(value, rel=1e-4), (law, name)


def test_leave_one_out_and_forward_errors_of_the_exponential_by_hand():
    rng = np.random.default_rng(3)
    y = 2.0 * 1.06 ** np.arange(20) * np.exp(rng.normal(0, 0.03, 20))
    fit = fit_growth(y, window=(2, 17)).law
    layers = np.arange(2, 18, dtype=float)
    ly = np.log(y[2:18])
    loo = 0.0
    for j in range(layers.size):
        keep = np.arange(layers.size) != j
        loo += (ly[j] - np.polyval(np.polyfit(layers[keep], ly[keep], 1), layers[j])) ** 2
    assert fit.laws["exponential"]["cv_log"] == pytest.approx(loo, rel=1e-9)
    n_fwd = round(2 * layers.size / 3)
    pred = np.polyval(np.polyfit(layers[:n_fwd], ly[:n_fwd], 1), layers[n_fwd:])
    assert fit.laws["exponential"]["forward_log"] == pytest.approx(float(((ly[n_fwd:] - pred) ** 2).sum()), rel=1e-9)


def test_bootstrap_interval_of_the_exponential_matches_a_naive_loop():
    rng = np.random.default_rng(4)
    x, w = per_sequence(rng, 10 * 1.05 ** np.arange(16), 40, 0.03)
    fit = fit_growth(x, window=(2, 13), weights=w, n_boot=300, seed=5)
    draws = np.random.default_rng(5).integers(0, 40, size=(300, 40))
    layers = np.arange(2, 14, dtype=float)
    g = []
    for idx in draws:
        m = (w[idx, None] * x[idx][:, 2:14]).sum(0) / w[idx].sum()
        g.append(math.exp(np.polyfit(layers, np.log(m), 1)[0]))
    lo, hi = np.quantile(g, [0.025, 0.975])
    np.testing.assert_allclose(fit.law.laws["exponential"]["ci95"]["growth_factor"], [lo, hi], rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# decisions on planted curves (the calibration table itself: tests/test_calibration.py)
# ------------------------------------------------------------------------------------------------
def test_planted_power_with_origin_four_is_power_and_exponential_is_rejected():
    x, w = per_sequence(np.random.default_rng(6), (np.arange(48) + 4.0) ** 1.5, 40, 0.03)
    fit = fit_growth(x, window=(5, 41), weights=w)
    assert fit.law.best == "power"
    assert {"exponential", "linear"} <= set(fit.law.rejected_laws)
    lo, hi = fit.law.laws["power"]["ci95"]["exponent"]
    assert lo <= 1.5 <= hi
    lo, hi = fit.law.laws["power"]["ci95"]["origin"]
    assert lo <= 4.0 <= hi


def test_a_curve_that_peaks_and_falls_follows_no_law():
    layers = np.arange(12, dtype=float)
    curve = 10.0 * np.exp(0.4 * layers - 0.04 * layers**2)  # rises to layer 5, then falls
    x, w = per_sequence(np.random.default_rng(7), curve, 59, 0.02)
    fit = fit_growth(x, window=(1, 10), weights=w)
    assert fit.law.best == NONE and set(fit.law.rejected_laws) == set(LAWS)
    assert "none" in format_fit_table({"resid_post": fit}).splitlines()[2]


def test_short_windows_are_undecided_but_still_report_rejections():
    x, w = per_sequence(np.random.default_rng(8), 10.0 * 1.05 ** np.arange(8), 59, 0.02)
    fit = fit_growth(x, weights=w)  # default window 1..6
    assert fit.window == (1, 6) and fit.law.best == UNDECIDED
    assert any("6 layers" in r for r in fit.law.support["undecided_because"])
    steep = 0.5 * np.exp(0.6 * np.arange(8))
    one = fit_growth(steep, window=(0, 6))  # the least-squares line goes negative: linear cannot fit
    assert one.law.best == UNDECIDED and "linear" in one.law.rejected_laws


def test_curvature_flag_needs_five_layers():
    layers = np.arange(8)
    x, w = per_sequence(np.random.default_rng(6), 10.0 * 1.05**layers * np.exp(0.05 * layers**2), 60, 0.02)
    short = fit_growth(x, window=(1, 4), weights=w)
    assert short.curvature_ci95[0] > 0 and not short.curvature_tested and curvature_flag(short) == ""
    longer = fit_growth(x, window=(1, 5), weights=w)
    assert longer.curvature_tested and curvature_flag(longer) == "faster than exponential"


def test_few_sequences_warn():
    x, w = per_sequence(np.random.default_rng(9), 10.0 * 1.05 ** np.arange(12), 10, 0.05)
    with pytest.warns(UserWarning, match="only 10 sequences"):
        fit_growth(x, weights=w)
    x, w = per_sequence(np.random.default_rng(9), 10.0 * 1.05 ** np.arange(12), 30, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_growth(x, weights=w)
        fit_growth(x[0])  # one curve: no bootstrap, no warning


# ------------------------------------------------------------------------------------------------
# JSON, tables, comparison
# ------------------------------------------------------------------------------------------------
def test_json_carries_the_law_block_and_round_trips():
    x, w = per_sequence(np.random.default_rng(10), 10.0 + np.arange(48.0), 40, 0.03)
    fit = fit_growth(x, window=(5, 41), weights=w)
    doc = json.loads(json.dumps(fit.to_json(), allow_nan=False))
    law = doc["law"]
    assert law["best"] == "linear" and set(law["laws"]) == set(LAWS)
    assert "exponential" in {r["law"] for r in law["rejected"]}
    for r in law["rejected"]:
        assert {"law", "rss_ratio", "p_value", "test"} <= set(r)
    for entry in law["laws"].values():
        assert {"params", "ci95", "rss_log", "cv_log", "forward_log", "aicc", "lack_of_fit_p"} <= set(entry)
    back = GrowthFit.from_json(doc)
    assert back.law.best == "linear" and back.law.rejected == law["rejected"]
    legacy = {k: v for k, v in doc.items() if k not in ("law", "local_slope", "window_sensitivity", "mean_log_slope")}
    old = GrowthFit.from_json(legacy)
    assert old.law is None and math.isnan(old.mean_log_slope) and old.window_sensitivity == {}


def test_tables_show_the_law_its_rejections_and_each_rss():
    x, w = per_sequence(np.random.default_rng(11), 10.0 + np.arange(48.0), 40, 0.03)
    fit = fit_growth(x, window=(5, 41), weights=w)
    row = format_fit_table({"resid_post": fit}).splitlines()[2]
    ratio = next(r["rss_ratio"] for r in fit.law.rejected if r["law"] == "exponential")
    assert "linear" in row and f"exp. rejected (RSS x{ratio:.1f})" in row
    text = format_law_table({"resid_post": fit.law})
    for law in LAWS:
        line = next(ln for ln in text.splitlines() if ln.split()[:2] == ["resid_post", law])
        assert f"{fit.law.laws[law]['rss_log']:.4g}" in line
    assert "resid_post: law linear" in text


def test_compare_laws_never_compares_power_exponents():
    layers = np.arange(48.0)
    a, w = per_sequence(np.random.default_rng(12), (layers + 4.0) ** 1.5, 40, 0.03)
    b, _ = per_sequence(np.random.default_rng(13), (layers + 1.0) ** 2.0, 40, 0.03)
    fa, fb = fit_growth(a, window=(5, 41), weights=w).to_json(), fit_growth(b, window=(5, 41), weights=w).to_json()
    assert fa["law"]["best"] == fb["law"]["best"] == "power"
    out = compare_laws(fa, fb)
    assert not out["comparable"] and "origin" in out["note"]
    e1, _ = per_sequence(np.random.default_rng(14), 10 * 1.05**layers, 40, 0.03)
    e2, _ = per_sequence(np.random.default_rng(15), 10 * 1.03**layers, 40, 0.03)
    fe1, fe2 = fit_growth(e1, window=(5, 41), weights=w).to_json(), fit_growth(e2, window=(5, 41), weights=w).to_json()
    both = compare_laws(fe1, fe2)
    assert both["comparable"] and both["parameter"] == "growth_factor"
    assert law_rate_text(fe1).startswith("+5.0 %/layer")


def test_fit_command_prints_the_laws_and_writes_the_law_block(tmp_path):
    from typer.testing import CliRunner

    from normgrowth.cli import app

    y = 0.5 * np.exp(0.6 * np.arange(12))
    path = tmp_path / "curve.csv"
    path.write_text("\n".join(repr(float(v)) for v in y) + "\n")
    out = tmp_path / "fit.json"
    result = CliRunner().invoke(app, ["fit", str(path), "--window", "0:11", "--json", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for law in LAWS:
        assert any(ln.split()[:2] == ["curve", law] for ln in result.output.splitlines()), law
    doc = json.loads(out.read_text())
    assert "linear" in {r["law"] for r in doc["law"]["rejected"]}
    assert {"local_slope", "window_sensitivity", "mean_log_slope"} <= set(doc)


def test_single_curve_exponential_interval_is_the_regression_t_interval():
    from scipy import stats

    y = 10 * 1.05 ** np.arange(20) * np.exp(np.random.default_rng(1).normal(0, 0.03, 20))
    fit = fit_growth(y, window=(2, 17)).law
    r = stats.linregress(np.arange(2, 18), np.log(y[2:18]))
    t = stats.t.ppf(0.975, 14)
    np.testing.assert_allclose(fit.laws["exponential"]["ci95"]["growth_factor"],
                               np.exp([r.slope - t * r.stderr, r.slope + t * r.stderr]), rtol=1e-9)
