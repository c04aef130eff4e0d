"""compare's statistics: p-values, Holm correction, deterministic position 0, weight rows in comparable units."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from normgrowth.cli import app
from normgrowth.compare import ComparisonResult, adjust_rows, comparable_weight_fit, p_value_from_ci, row


def test_p_value_is_the_normal_approximation_of_the_ci():
    z = stats.norm.ppf(0.975)
    se = 0.1
    p = p_value_from_ci(0.25, [0.25 - z * se, 0.25 + z * se])
    assert p == pytest.approx(2 * stats.norm.sf(2.5), rel=1e-9)
    assert p_value_from_ci(0.0, [-1.0, 1.0]) == pytest.approx(1.0)
    assert p_value_from_ci(1.0, [None, 2.0]) is None
    r = row("x", 2.0, [1.8, 2.2], 1.0, [0.9, 1.1])
    assert r["p_value"] < 0.05 and r["significant"]  # CI excludes 0 <=> p < 0.05 for a normal row


def test_holm_adjustment_across_rows():
    """Textbook example: p = (0.01, 0.04, 0.03, 0.005) -> Holm (0.03, 0.06, 0.06, 0.02)."""
    z = stats.norm.ppf(0.975)
    rows = []
    for p in (0.01, 0.04, 0.03, 0.005):
        d = stats.norm.isf(p / 2)  # a difference with SE 1 and two-sided p
        rows.append(row("r", d, None, 0.0, None, diff=d, diff_ci=[d - z, d + z], method="test"))
    rows.append(row("descriptive", 1.0, None, 2.0, None))
    adjust_rows(rows)
    np.testing.assert_allclose([r["p_holm"] for r in rows[:4]], [0.03, 0.06, 0.06, 0.02], rtol=1e-9)
    assert [r["significant"] for r in rows[:4]] == [True, True, True, True]
    assert [r["significant_holm"] for r in rows[:4]] == [True, False, False, True]
    assert rows[4]["p_holm"] is None and not rows[4]["significant_holm"]


def test_weight_rows_of_ln_free_models_become_gains_on_the_normalised_input():
    """Planted: folded LN-free weights = c * g^l / sigma_l with a growing sigma; times sigma, g is recovered."""
    n, g = 8, 1.05
    sigma = 0.5 * 1.3 ** np.arange(n)
    folded = 2.0 * g ** np.arange(n) / sigma
    from normgrowth.fit import fit_growth

    doc = {"model": "planted", "ln_free": True,
           "layers": [{"W_OV_heads": [v, v], "W_in": v, "W_out": 1.0} for v in folded],
           "fit": {s: fit_growth(folded, window=(1, 6)).to_json() for s in ("W_OV_mean", "W_in", "W_out")}}
    res = types.SimpleNamespace(sites={"resid_pre": types.SimpleNamespace(token_std_mean=sigma), "resid_mid": None})
    fit, units = comparable_weight_fit(doc, res, "W_OV_mean")
    assert fit["growth_factor"] == pytest.approx(g, rel=1e-9) and fit["window"] == [1, 6]
    assert "sigma of resid_pre" in units
    assert doc["fit"]["W_OV_mean"]["growth_factor"] == pytest.approx(g / 1.3, rel=1e-9)  # raw: not comparable
    fit_in, units_in = comparable_weight_fit(doc, res, "W_in")  # no resid_mid (parallel blocks): resid_pre
    assert fit_in["growth_factor"] == pytest.approx(g, rel=1e-9) and "resid_pre" in units_in
    assert comparable_weight_fit(doc, res, "W_out")[1] == "as stored"  # reads the MLP hidden layer
    ln = dict(doc, ln_free=False)
    assert comparable_weight_fit(ln, res, "W_OV_mean") == (doc["fit"]["W_OV_mean"], "as stored")


def test_position0_rows_are_deterministic_when_position_0_is_one_token(tiny_dirs, tmp_path):
    tokens = np.random.RandomState(1).randint(1, 100, size=(6, 12))
    tokens[:, 0] = 0  # the same BOS everywhere
    np.save(tmp_path / "t.npy", tokens)
    out = CliRunner().invoke(app, ["compare", str(tiny_dirs["gpt2"]), str(tiny_dirs["gpt2_lnfree"]), "--data",
                                   str(tmp_path / "t.npy"), "--no-deletion", "--json", str(tmp_path / "c.json")],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["position0_deterministic"] is True
    pos0 = [r for r in doc["rows"] if r["label"].startswith("position-0")]
    assert len(pos0) == 2
    for r in pos0:
        assert r["deterministic"] and not r["has_ci"] and not r["significant"] and r["p_value"] is None
        assert "no significance claim" in r["sentence"]
    assert any("fewer than 30" in w for w in doc["warnings"])  # 6 sequences
    assert doc["n_tests"] == sum(r["p_value"] is not None for r in doc["rows"])
    assert "exact" in out.output and "p Holm" in out.output
    back = ComparisonResult(doc)
    frame = back.to_frame()
    assert set(frame.columns) >= {"model", "site", "layer", "statistic", "value", "p_holm"}
    assert "rows" in back.summary()
    path = back.save(tmp_path / "saved")
    assert ComparisonResult.load(path).to_json()["rows"] == doc["rows"]


def _planted_curves(law: str, rate: float, seed: int, n_seqs: int = 40, n_layers: int = 12) -> np.ndarray:
    """Per-sequence norm curves of one law (1 % multiplicative noise per sequence and layer)."""
    layers = np.arange(n_layers, dtype=float)
    base = {"exponential": rate**layers, "linear": 1.0 + rate * layers, "power": (layers + 1.0) ** rate}[law]
    noise = np.random.default_rng(seed).normal(0.0, 0.01, (n_seqs, n_layers))
    return base[None, :] * np.exp(noise)


@pytest.mark.parametrize("law_a,law_b,expect", [
    ("exponential", "exponential", "growth factor per layer"),
    ("linear", "linear", "relative_slope (linear law)"),
    ("exponential", "linear", "descriptive"),
])
def test_growth_rows_compare_like_with_like(law_a, law_b, expect):
    from normgrowth.compare import _growth_row
    from normgrowth.fit import fit_growth, growth_difference
    from normgrowth.laws import compare_laws

    rates = {"exponential": (1.10, 1.05), "linear": (0.5, 0.2)}
    ca = _planted_curves(law_a, rates[law_a][0], seed=1)
    cb = _planted_curves(law_b, rates[law_b][1], seed=2)
    window = (1, 10)
    fa, fb = (fit_growth(c, window=window, n_boot=400).to_json() for c in (ca, cb))
    assert (fa["law"]["best"], fb["law"]["best"]) == (law_a, law_b)  # the planted laws are recognised
    gd = growth_difference(ca, cb, window, n_boot=400)
    r = _growth_row("resid_post", fa, fb, gd, compare_laws(fa, fb))
    if expect == "descriptive":
        assert r["p_value"] is None and not r["has_ci"] and r["method"].startswith("descriptive")
        assert r["a"] == pytest.approx(fa["growth_factor"])
        return
    assert r["label"].startswith(expect)
    assert r["p_value"] is not None and r["significant"]  # the planted rates differ a lot
    if law_a == "exponential":
        assert r["difference_ci95"] == pytest.approx(gd["difference_ci95"])
    else:
        # relative slope at the window's first layer: b / (a + b * l0) of the planted line 1 + b l
        assert r["a"] == pytest.approx(0.5 / (1 + 0.5 * window[0]), rel=0.05)
        assert r["b"] == pytest.approx(0.2 / (1 + 0.2 * window[0]), rel=0.05)
