"""normgrowth.numerics and normgrowth.storage against independent computations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from normgrowth import numerics as nm
from normgrowth.storage import atomic_write_json, json_safe


def test_fit_line_matches_normal_equations():
    rng = np.random.default_rng(1)
    x = np.arange(12.0)
    y = 0.3 + 1.7 * x + rng.normal(0, 0.5, x.size)
    fit = nm.fit_line(x, y)
    design = np.stack([np.ones_like(x), x], 1)
    coef, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    assert fit.slope == pytest.approx(coef[1], rel=1e-12)
    assert fit.intercept == pytest.approx(coef[0], rel=1e-12)
    assert fit.rss == pytest.approx(float(rss[0]), rel=1e-10)
    s2 = float(rss[0]) / (x.size - 2)
    assert fit.slope_se == pytest.approx(math.sqrt(s2 / np.sum((x - x.mean()) ** 2)), rel=1e-10)
    lo, hi = fit.slope_ci()
    assert (hi - lo) / 2 == pytest.approx(stats.t.ppf(0.975, x.size - 2) * fit.slope_se, rel=1e-12)


def test_fit_line_refuses_one_distinct_x():
    with pytest.raises(ValueError):
        nm.fit_line([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])


def test_polyfit_rows_top_coefficient_matches_numpy_polyfit():
    rng = np.random.default_rng(2)
    x = np.arange(3.0, 11.0)
    y = rng.normal(size=(5, x.size))
    coef = nm.polyfit_rows(x, y, 2)
    for row, c in zip(y, coef):
        ref = np.polyfit(x, row, 2)  # highest power first
        assert c[2] == pytest.approx(ref[0], rel=1e-9, abs=1e-12)
    # the slope of a line does not depend on centring
    assert nm.polyfit_rows(x, y, 1)[:, 1] == pytest.approx([np.polyfit(x, r, 1)[0] for r in y], rel=1e-9)


def test_loglinear_slope_recovers_planted_rate_and_skips_bad_points():
    x = np.arange(10.0)
    y = 2.0 * 1.25**x
    y_bad = y.copy()
    y_bad[3] = 0.0
    y_bad[5] = np.nan
    assert math.exp(nm.loglinear_slope(x, y)) == pytest.approx(1.25, rel=1e-12)
    assert math.exp(nm.loglinear_slope(x, y_bad)) == pytest.approx(1.25, rel=1e-12)
    assert math.isnan(nm.loglinear_slope([1.0, 1.0], [1.0, 2.0]))


def test_resample_counts_rows_sum_to_n_and_chunks_are_consistent():
    counts = np.concatenate(list(nm.resample_counts(7, 50, seed=3)))
    assert counts.shape == (50, 7)
    assert np.all(counts.sum(1) == 7)
    # same seed, same draws, whatever the chunking
    nm_chunk = nm._BOOT_CHUNK_CELLS
    try:
        nm._BOOT_CHUNK_CELLS = 7 * 4
        small = np.concatenate(list(nm.resample_counts(7, 50, seed=3)))
    finally:
        nm._BOOT_CHUNK_CELLS = nm_chunk
    assert np.array_equal(small, counts)  # the replicates do not depend on the chunk size


def test_bootstrap_means_equal_explicit_resampling():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 3))
    w = rng.integers(1, 5, size=9).astype(float)
    counts = np.concatenate(list(nm.resample_counts(9, 20, seed=5)))
    boot = nm.bootstrap_means(x, w, n_boot=20, seed=5)
    for b in range(20):
        idx = np.repeat(np.arange(9), counts[b].astype(int))  # the drawn sequences, listed out
        ref = np.average(x[idx], axis=0, weights=w[idx])
        assert boot[b] == pytest.approx(ref, rel=1e-12)


def test_bootstrap_ci_covers_the_mean_like_the_normal_theory():
    rng = np.random.default_rng(6)
    x = rng.normal(10.0, 2.0, size=400)
    ci = nm.percentile_ci(nm.bootstrap_means(x, n_boot=2000, seed=7))
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci.lo == pytest.approx(x.mean() - half, abs=0.25 * half)
    assert ci.hi == pytest.approx(x.mean() + half, abs=0.25 * half)
    assert ci.n_nonfinite == 0


def test_percentile_ci_counts_nan_replicates():
    s = np.array([1.0, 2.0, np.nan, 3.0, np.inf, 4.0])
    ci = nm.percentile_ci(s)
    ref_lo, ref_hi = np.quantile([1.0, 2.0, 3.0, 4.0], [0.025, 0.975])
    assert (ci.lo, ci.hi, ci.n_nonfinite, ci.n_boot) == (pytest.approx(ref_lo), pytest.approx(ref_hi), 2, 6)
    all_nan = nm.percentile_ci(np.full((4, 2), np.nan))
    assert np.all(np.isnan(all_nan.as_array())) and list(all_nan.n_nonfinite) == [4, 4]


def test_weighted_mean_skip_nan():
    x = np.array([[1.0, np.nan], [3.0, 5.0]])
    assert nm.weighted_mean(x, [1.0, 3.0], skip_nan=True) == pytest.approx([2.5, 5.0])
    assert np.isnan(nm.weighted_mean(x, [1.0, 3.0])[1])


def test_t_interval_and_welch_df():
    lo, hi = nm.t_interval(1.0, 0.5, 4)
    assert hi - 1.0 == pytest.approx(stats.t.ppf(0.975, 4) * 0.5)
    lo, hi = nm.t_interval(1.0, 0.5, math.inf)
    assert hi - 1.0 == pytest.approx(1.959963984540054 * 0.5)
    assert all(math.isnan(v) for v in nm.t_interval(1.0, math.nan, 3))
    # two equal variances with equal df: df doubles
    assert nm.welch_satterthwaite_df([1.0, 1.0], [5, 5]) == pytest.approx(10.0)
    assert nm.welch_satterthwaite_df([1.0, 1.0], [math.inf, math.inf]) == math.inf


def test_difference_ci_from_cis_and_weighted_mean_ci():
    diff, (lo, hi) = nm.difference_ci_from_cis(3.0, (2.0, 4.0), 1.0, (0.5, 1.5))
    se_a, se_b = 1.0 / 1.959963984540054, 0.5 / 1.959963984540054
    assert diff == 2.0 and hi - diff == pytest.approx(1.959963984540054 * math.hypot(se_a, se_b))
    assert math.isnan(nm.difference_ci_from_cis(1.0, (None, None), 0.0, (0, 1))[1][0])
    v = np.random.default_rng(8).normal(5, 1, 200)
    mean, (lo, hi) = nm.weighted_mean_ci(v)  # equal weights: the textbook mean +- 1.96 s/sqrt(n) (ddof 1)
    assert mean == pytest.approx(v.mean())
    assert (hi - lo) / 2 == pytest.approx(1.959963984540054 * v.std(ddof=1) / math.sqrt(v.size), rel=1e-9)


def test_holm_adjust_matches_the_step_down_definition():
    p = [0.01, 0.04, None, 0.03, 0.5]
    adj = nm.holm_adjust(p)
    # sorted: 0.01 (x4), 0.03 (x3), 0.04 (x2), 0.5 (x1), each at least the previous
    assert adj == [pytest.approx(0.04), pytest.approx(0.09), None, pytest.approx(0.09), pytest.approx(0.5)]


def test_excludes_zero():
    assert nm.excludes_zero((0.1, 0.2)) and nm.excludes_zero((-0.2, -0.1))
    assert not nm.excludes_zero((-0.1, 0.1)) and not nm.excludes_zero((None, 0.2))


def test_json_safe_and_atomic_write(tmp_path):
    import torch

    doc = {"a": np.float32(1.5), "b": [np.nan, np.inf, 2], "c": np.arange(3), "d": torch.tensor([1.0, float("nan")]),
           "e": np.bool_(True), 3: "k"}
    safe = json_safe(doc)
    assert safe == {"a": 1.5, "b": [None, None, 2], "c": [0, 1, 2], "d": [1.0, None], "e": True, "3": "k"}
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, doc)
    assert json.loads(path.read_text()) == safe
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left behind
