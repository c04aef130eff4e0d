"""compare's statistics: p-values, Holm correction, deterministic position 0, weight rows in comparable units."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from normgrowth.cli import app
from normgrowth.compare import (FAMILY, ComparisonResult, across_seeds, adjust_rows, comparable_weight_fit,
                                p_value_from_ci, row, same_token_batch)


def test_p_value_is_the_normal_approximation_of_the_ci():
    z = stats.norm.ppf(0.975)
    se = 0.1
    p = p_value_from_ci(0.25, [0.25 - z * se, 0.25 + z * se])
    assert p == pytest.approx(2 * stats.norm.sf(2.5), rel=1e-9)
    assert p_value_from_ci(0.0, [-1.0, 1.0]) == pytest.approx(1.0)
    assert p_value_from_ci(1.0, [None, 2.0]) is None
    r = row("x", 2.0, [1.8, 2.2], 1.0, [0.9, 1.1], role=FAMILY)
    assert r["p_value"] < 0.05 and r["significant"]  # CI excludes 0 <=> p < 0.05 for a normal row
    outside = row("x", 2.0, [1.8, 2.2], 1.0, [0.9, 1.1])  # not in the tested family: no p-value, descriptive
    assert outside["p_value"] is None and not outside["family"] and outside["role"].startswith("descriptive")


def test_holm_adjustment_across_rows():
    """Textbook example: p = (0.01, 0.04, 0.03, 0.005) -> Holm (0.03, 0.06, 0.06, 0.02)."""
    z = stats.norm.ppf(0.975)
    rows = []
    for p in (0.01, 0.04, 0.03, 0.005):
        d = stats.norm.isf(p / 2)  # a difference with SE 1 and two-sided p
        rows.append(row("r", d, None, 0.0, None, diff=d, diff_ci=[d - z, d + z], method="test", role=FAMILY))
    rows.append(row("descriptive", 1.0, None, 2.0, None, diff=-1.0, diff_ci=[-1.5, -0.5]))  # outside the family
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


def test_pairing_needs_the_same_token_batch():
    from normgrowth.results import token_batch_hash

    tokens = np.arange(12).reshape(3, 4)
    mask = np.ones((3, 4), dtype=bool)
    h = token_batch_hash(tokens, mask)
    other = tokens.copy()
    other[2, 3] = 99
    assert token_batch_hash(tokens.copy(), mask) == h and token_batch_hash(other, mask) != h
    masked = mask.copy()
    masked[2, 3] = False  # the last token becomes padding: a different batch
    assert token_batch_hash(tokens, masked) != h

    def res(hash_, counts=(3, 3, 3)):
        return types.SimpleNamespace(meta=types.SimpleNamespace(token_hash=hash_), seq_n_tokens=np.array(counts))

    assert same_token_batch(res(h), res(h))[0]
    assert not same_token_batch(res(h), res(token_batch_hash(other, mask)))[0]
    assert not same_token_batch(res(h), res(None))[0]
    assert not same_token_batch(res(h), res(h, (3, 3, 2)))[0]


def test_across_seeds_summary_on_planted_differences():
    """Three seeds with planted twin-control differences: mean, t interval and t-test p against scipy."""
    planted = {"growth factor per layer, resid_post": [0.010, 0.014, 0.012],
               "growth factor per layer, attn_out": [0.003, -0.004, 0.002]}
    docs = []
    for s_ in range(3):
        rows = [row(lab, 1.0 + d[s_], None, 1.0, None, diff=d[s_], diff_ci=[d[s_] - 0.001, d[s_] + 0.001],
                    role=FAMILY) for lab, d in planted.items()]
        rows.append(row("weight-norm growth per layer, W_in", 1.1, [1.0, 1.2], 1.0, [0.9, 1.1]))  # descriptive
        docs.append({"names": ["twin", "control"], "rows": rows})
    out = across_seeds(docs)
    assert [r["label"] for r in out["rows"]] == list(planted)
    for r, (lab, d) in zip(out["rows"], planted.items()):
        d = np.array(d)
        assert r["mean"] == pytest.approx(d.mean()) and r["n_seeds"] == 3
        half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
        np.testing.assert_allclose(r["ci95"], [d.mean() - half, d.mean() + half], rtol=1e-9)
        assert r["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-9)
    resid, attn = out["rows"]
    assert resid["significant_holm"] and not attn["significant_holm"]
    assert resid["p_holm"] == pytest.approx(min(1.0, 2 * resid["p_value"]))


def test_paired_growth_rows_in_a_comparison_document():
    """Two 'models' that saw the same sequences: the growth rows are paired, and narrower than unpaired."""
    from normgrowth.compare import compare_documents
    from normgrowth.fit import fit_site

    def fake(curves, hash_):
        st = types.SimpleNamespace(seq_mean=curves, mean=curves.mean(0), bos_mean=curves.mean(0),
                                   bos_std=np.zeros(curves.shape[1]), token_std_mean=np.ones(curves.shape[1]))
        meta = types.SimpleNamespace(model="m", ln_free=False, token_hash=hash_, norm_placement="pre",
                                     parallel_blocks=False, n_bos_tokens=curves.shape[0], n_layers=curves.shape[1])
        return types.SimpleNamespace(meta=meta, sites={"resid_post": st}, seq_n_tokens=np.full(curves.shape[0], 50.0))

    rng = np.random.default_rng(3)
    scale = rng.normal(0, 0.2, (40, 1)) + np.cumsum(rng.normal(0, 0.03, (40, 16)), axis=1)  # shared by both
    a = 10 * 1.05 ** np.arange(16) * np.exp(scale)
    b = 10 * 1.04 ** np.arange(16) * np.exp(scale + rng.normal(0, 0.005, (40, 16)))
    docs = {}
    for key, hashes in (("paired", ("h", "h")), ("independent", ("h", "g"))):
        ra, rb = fake(a, hashes[0]), fake(b, hashes[1])
        fits = [{"fit": {"resid_post": fit_site(r, "resid_post").to_json()}} for r in (ra, rb)]
        docs[key] = compare_documents(ra, rb, fits[0], fits[1], n_boot=400)
    width = {k: np.diff(d["rows"][0]["difference_ci95"])[0] for k, d in docs.items()}
    assert docs["paired"]["paired"] and not docs["independent"]["paired"]
    assert "paired bootstrap" in docs["paired"]["rows"][0]["method"]
    assert width["paired"] < 0.5 * width["independent"]
    lo, hi = docs["paired"]["rows"][0]["difference_ci95"]
    assert lo <= 0.01 <= hi and docs["paired"]["rows"][0]["family"]


