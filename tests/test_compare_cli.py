"""compare (schema, difference CIs, sentences) and the weights / deletion / fit commands end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from normgrowth.cli import app
from scipy import stats

from normgrowth.compare import FAMILY, row

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


def test_row_difference_ci_is_the_normal_combination():
    r = row("x", 2.0, [1.8, 2.2], 1.0, [0.9, 1.1], role=FAMILY)
    z = float(stats.norm.ppf(0.975))
    se_a, se_b = 0.4 / (2 * z), 0.2 / (2 * z)
    half = z * math.sqrt(se_a**2 + se_b**2)
    assert r["difference"] == pytest.approx(1.0)
    assert r["difference_ci95"] == pytest.approx([1.0 - half, 1.0 + half])
    assert r["significant"] and r["has_ci"]
    same = row("y", 1.0, [0.8, 1.2], 1.05, [0.85, 1.25], role=FAMILY)
    assert not same["significant"] and same["has_ci"]
    bare = row("z", 1.0, None, 2.0, None)
    assert not bare["has_ci"] and not bare["significant"]


@pytest.fixture(scope="module")
def compare_json(tiny_dirs, token_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    result = invoke("compare", tiny_dirs["gpt2"], tiny_dirs["gpt2_lnfree"], "--data", token_file,
                    "--out", out / "cache", "--json", out / "cmp.json", "--figure", out / "cmp.png")
    assert result.exit_code == 0, result.output
    return json.loads((out / "cmp.json").read_text()), result.output, out


def test_compare_schema_and_sentences(compare_json):
    doc, text, out = compare_json
    assert doc["ln_free"] == [False, True]
    assert set(doc["growth"]) == {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
    for site, g in doc["growth"].items():
        assert set(g) == {"a", "b", "difference", "law"}
        lo, hi = g["difference"]["difference_ci95"]
        assert lo <= g["difference"]["difference"] <= hi
        assert g["difference"]["difference"] == pytest.approx(g["a"]["growth_factor"] - g["b"]["growth_factor"])
    labels = [r["label"] for r in doc["rows"]]
    assert any("position-0" in x for x in labels) and any("attn_out norm" in x for x in labels)
    assert any("retention at distance" in x for x in labels) and any("W_OV_mean" in x for x in labels)
    assert doc["n_tests"] == sum(r["p_value"] is not None for r in doc["rows"]) == 5  # the family: five sites
    for r in doc["rows"]:
        assert r["family"] == r["label"].startswith("growth factor per layer, ")
        assert (r["p_holm"] is None) == (r["p_value"] is None) and (r["p_value"] is not None) == (r["family"]
                                                                                                 and r["has_ci"])
        if "W_OV_mean" in r["label"]:
            assert "regression residual" in r["role"] and "no significance claim" in r["sentence"]
        if "retention at distance" in r["label"]:
            assert "geometry only" in r["role"]
        if r["p_value"] is not None:
            assert r["p_holm"] >= r["p_value"]
    assert len(doc["sentences"]) == len(doc["rows"])
    for r in doc["rows"]:
        if r["significant"]:
            assert "significant" in r["sentence"] and "excludes 0" in r["sentence"]
    # both models read the same token file: their sequences are paired
    assert doc["paired"] and "paired bootstrap" in doc["resampling"] and "paired bootstrap" in text
    assert all("paired" in r["method"] for r in doc["rows"] if r["family"])
    # 3-layer windows decide no law; the laws are a note beside the growth rows
    assert doc["growth"]["resid_post"]["law"]["law_a"] == "undecided"
    assert (out / "cmp.png").stat().st_size > 0 and (out / "cmp.pdf").stat().st_size > 0


def test_compare_reuses_cached_results(compare_json, tiny_dirs, token_file):
    _, _, out = compare_json
    n_before = len(list((out / "cache").glob("*.json")))
    result = invoke("compare", tiny_dirs["gpt2"], tiny_dirs["gpt2_lnfree"], "--data", token_file,
                    "--out", out / "cache")
    assert result.exit_code == 0
    assert result.output.count("reusing cached result") >= 6  # report, weights, deletion for both models
    assert len(list((out / "cache").glob("*.json"))) == n_before


def test_weights_command_schema(tiny_dirs, token_file, tmp_path):
    result = invoke("weights", tiny_dirs["neox"], "--data", token_file, "--json", tmp_path / "w.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "w.json").read_text())
    assert set(doc) == {"model", "ln_free", "normalization", "norm_placement", "parallel_blocks", "weights",
                        "random_inputs", "comparison"}
    assert doc["norm_placement"] == "pre" and doc["parallel_blocks"] is True  # GPT-NeoX: parallel attention and MLP
    assert doc["model"] == str(tiny_dirs["neox"]) and doc["ln_free"] is False and doc["normalization"] == "LN"
    w = doc["weights"]
    assert len(w["layers"]) == 3 and len(w["layers"][0]["W_OV_heads"]) == 4
    for key in ("W_in", "W_out", "W_Q", "gain_attn"):
        assert key in w["layers"][0]
    assert "W_out" in w["fit"] and set(w["fit"]["W_out"]) >= {"growth_factor", "ci95", "window"}
    assert doc["comparison"] is not None and doc["random_inputs"] is not None
    assert len(doc["comparison"]["ratio_attn"]) == 3 and doc["random_inputs"]["n_seqs"] == 8


def test_weights_command_without_data_has_no_comparison(tiny_dirs, tmp_path):
    result = invoke("weights", tiny_dirs["gpt2"], "--random-seqs", "2", "--random-len", "8",
                    "--json", tmp_path / "w.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "w.json").read_text())
    assert doc["comparison"] is None and doc["random_inputs"]["seq_len"] == 8
    assert "random-input gains (input std" in result.output


def test_deletion_command_schema(tiny_dirs, token_file, tmp_path):
    result = invoke("deletion", tiny_dirs["llama"], "--data", token_file, "--ablate", "0,2",
                    "--json", tmp_path / "d.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "d.json").read_text())
    n_writes, n_readers = 1 + 2 * 3, 3 + 1
    assert len(doc["writes"]) == n_writes and len(doc["readers"]) == n_readers
    assert np.array(doc["retention"], dtype=float).shape == (n_readers, n_writes)
    for key in ("distance", "retention", "dilution", "visibility", "reading", "visibility_decay_per_layer",
                "dilution_decay_per_layer", "excess_dilution_decay_per_layer", "retention_far"):
        assert key in doc["by_distance"]
    assert f"VERDICT: {doc['verdict']['label']} - {doc['verdict']['reason']}" in result.output  # JSON = printout
    assert set(doc["locality"]["share_within"]) == {"1", "2", "4", "8"}
    assert doc["ablation"]["writes"] == ["attn_out.0", "mlp_out.0", "attn_out.2", "mlp_out.2"]


def test_fit_command_reproduces_endpoint(tmp_path):
    curve = np.exp(0.04 * np.arange(48)) * (1 + 0.02 * np.cos(np.arange(48)))
    (tmp_path / "c.json").write_text(json.dumps(curve.tolist()))
    result = invoke("fit", tmp_path / "c.json", "--window", "5:41", "--json", tmp_path / "f.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "f.json").read_text())
    study = 10 ** ((math.log10(curve[41]) - math.log10(curve[5])) / 36)
    assert round(doc["endpoint_growth_factor"], 4) == round(study, 4)
    assert doc["ci95"][0] < doc["growth_factor"] < doc["ci95"][1] and doc["window"] == [5, 41]
