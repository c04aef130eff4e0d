"""`normgrowth fit` on the published GPT-2 residual-stream curves (../shared/fixtures/published_curves, skipped
when absent): every fit carries the model-free numbers and a law block with its rejections; on GPT-2 XL over
the study's window 5..41 the exponential is rejected and the endpoint estimate is the study's 1.0483."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

PUBLISHED = Path(__file__).parents[2] / "shared" / "fixtures" / "published_curves"
MODELS = {"gpt2": 12, "gpt2-medium": 24, "gpt2-large": 36, "gpt2-xl": 48}

pytestmark = pytest.mark.skipif(not PUBLISHED.is_dir(), reason="published_curves fixture not present")


def column(name: str, col: str = "resid_post") -> np.ndarray:
    """The curve read with the csv module, ordered by its layer column (independent of normgrowth's reader)."""
    with open(PUBLISHED / f"{name}_std_tokens.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["layer"]))
    return np.array([float(r[col]) for r in rows])


def run_fit(tmp_path: Path, name: str, *extra: str) -> tuple[str, dict]:
    from typer.testing import CliRunner

    from normgrowth.cli import app

    out = tmp_path / f"{name}.json"
    result = CliRunner().invoke(app, ["fit", str(PUBLISHED / f"{name}_std_tokens.csv"), "--column", "resid_post",
                                      "--json", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_reports_model_free_numbers_and_the_law_block(tmp_path, name):
    output, doc = run_fit(tmp_path, name)
    n = column(name)
    assert n.size == MODELS[name]
    a, b = doc["window"]
    want = math.log(n[b] / n[a]) / (b - a)
    assert doc["mean_log_slope"] == pytest.approx(want, rel=1e-12)
    assert doc["ratio_last_first"] == pytest.approx(n[-1] / n[0], rel=1e-12)
    slopes = [math.log(n[j] / n[i]) / (j - i) for i in range(1, n.size - 1) for j in range(i + 4, n.size - 1)]
    ws = doc["window_sensitivity"]
    assert ws["min"] == pytest.approx(min(slopes)) and ws["max"] == pytest.approx(max(slopes))
    assert ws["n_windows"] == len(slopes)
    np.testing.assert_allclose(doc["local_slope"]["slope"][1:-1], (np.log(n[2:]) - np.log(n[:-2])) / 2, rtol=1e-12)
    assert {"best", "rejected", "laws"} <= set(doc["law"])
    assert f"{100 * math.expm1(want):+.2f}" in output


def test_gpt2_xl_rejects_the_exponential_and_gives_the_study_endpoint(tmp_path):
    output, doc = run_fit(tmp_path, "gpt2-xl", "--window", "5:41")
    n = column("gpt2-xl")
    endpoint = 10 ** ((math.log10(n[41]) - math.log10(n[5])) / 36)  # the study's formula
    assert round(endpoint, 4) == 1.0483
    assert doc["endpoint_growth_factor"] == pytest.approx(endpoint, rel=1e-12)
    assert "endpoint estimate (n[41]/n[5])^(1/36) = 1.048301" in output
    rejected = {r["law"]: r for r in doc["law"]["rejected"]}
    assert "exponential" in rejected and doc["law"]["best"] != "exponential"
    # its log-space RSS is about 4x that of the linear law (independent least squares)
    layers = np.arange(5, 42, dtype=float)
    y = np.log(n[5:42])
    exp_rss = float(((y - np.polyval(np.polyfit(layers, y, 1), layers)) ** 2).sum())
    assert doc["law"]["laws"]["exponential"]["rss_log"] == pytest.approx(exp_rss, rel=1e-9)
    assert exp_rss / doc["law"]["laws"]["linear"]["rss_log"] > 3.5
    assert "exponential rejected (RSS x" in output
