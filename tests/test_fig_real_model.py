"""analyses/fig_real_model.py: the real model's four-panel figure, drawn from report/deletion/horizon JSON that the
project's own collectors wrote for a tiny Llama checkpoint (the real model's schema), and skipped when the model's
folder is absent."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VOCAB, build_tiny

ANALYSES = Path(__file__).resolve().parents[1] / "analyses"
if str(ANALYSES) not in sys.path:
    sys.path.insert(0, str(ANALYSES))

fig_real_model = importlib.import_module("fig_real_model")
SLUG = "tiny-llama"
pytestmark = pytest.mark.filterwarnings("ignore:only .* sequences feed the bootstrap")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """``R`` with ``models/tiny-llama/{report,deletion,horizon}.json`` of an 8-layer Llama (RMSNorm) checkpoint."""
    from normgrowth import collect
    from normgrowth.data import TokenBatch
    from normgrowth.deletion import collect_deletion
    from normgrowth.horizon import collect_horizon
    from normgrowth.models import load_model
    from normgrowth.report import report_document
    from normgrowth.storage import atomic_write_json

    ckpt = build_tiny("llama", tmp_path_factory.mktemp("ckpt") / "llama", seed=1, n_layers=8)
    tokens = torch.from_numpy(np.random.RandomState(5).randint(1, VOCAB, size=(6, 12)))
    tokens[:, 0] = 0
    batch = TokenBatch(tokens=tokens, attention_mask=torch.ones_like(tokens, dtype=torch.bool), source="random ids")
    model = load_model(str(ckpt))
    root = tmp_path_factory.mktemp("real_results")
    out = root / "models" / SLUG
    report = report_document(collect(model, batch))
    # planted law block: the title must name the outcome and every rejected law
    report["fit"]["resid_post"]["law"] = {"best": "power", "window": report["fit"]["resid_post"]["window"],
                                          "laws": {}, "support": {},
                                          "rejected": [{"law": "linear", "rss_ratio": 3.0, "p_value": 0.001},
                                                       {"law": "saturating", "rss_ratio": 2.0, "p_value": 0.002}]}
    atomic_write_json(out / "report.json", report)
    atomic_write_json(out / "deletion.json", collect_deletion(model, batch, n_boot=50).to_json())
    atomic_write_json(out / "horizon.json", collect_horizon(model, batch, horizons="1,2,4", causal_writes="none",
                                                            n_boot=50).to_json())
    return root


def _docs(root: Path) -> dict:
    folder = root / "models" / SLUG
    return {k: json.loads((folder / f"{k}.json").read_text()) for k in ("report", "deletion", "horizon")}


def test_panels_show_the_saved_numbers(results):
    docs = _docs(results)
    fig = fig_real_model.build(results / "models" / SLUG)
    ax_norm, ax_slope, ax_del, ax_hor = fig.axes
    sites = docs["report"]["sites"]
    lines = {ln.get_label(): np.asarray(ln.get_ydata(), dtype=float) for ln in ax_norm.get_lines()}
    for site in ("resid_post", "attn_out", "mlp_out"):
        np.testing.assert_allclose(lines[site], sites[site]["mean"], rtol=1e-12)
    np.testing.assert_allclose(lines["resid_post, position 0"], sites["resid_post"]["bos_mean"], rtol=1e-12)
    a, b = docs["report"]["fit"]["resid_post"]["window"]
    (shade,) = [p for p in ax_norm.patches if p.get_label().startswith("fit window")]
    x0, x1 = shade.get_x(), shade.get_x() + shade.get_width()
    assert (x0, x1) == pytest.approx((a, b))
    assert ax_norm.get_yscale() == "log"

    fit = docs["report"]["fit"]["resid_post"]
    title = ax_slope.get_title()
    assert "law: power" in title and "rejected: linear, saturating" in title
    slope = [ln for ln in ax_slope.get_lines() if ln.get_label().startswith("local slope")][0]
    np.testing.assert_allclose(slope.get_ydata(), fit["local_slope"]["slope"], rtol=1e-12)
    assert any(c.get_label().startswith("mean over") for c in ax_slope.collections)

    deletion = docs["deletion"]
    assert f"verdict: {deletion['verdict']['label']}" in ax_del.get_title()
    by = deletion["locality"]["by_distance"]
    reads = {ln.get_label(): ln for ln in ax_del.get_lines()}
    np.testing.assert_allclose(reads["I (live scale)"].get_xdata(), by["distance"])
    np.testing.assert_allclose(reads["I₀ (no growth)"].get_ydata(),
                               [v if v is not None and v > 0 else np.nan for v in by["read_no_growth"]])

    horizon = docs["horizon"]
    curves = {ln.get_label().split(":")[0]: ln for ln in ax_hor.get_lines() if ":" in ln.get_label()}
    for mode in ("live", "frozen"):
        np.testing.assert_allclose(curves[mode].get_xdata(), horizon["horizons"])
        np.testing.assert_allclose(curves[mode].get_ydata(), 100 * np.asarray(horizon[mode]["excess"], dtype=float))


def test_title_names_the_quantisation():
    gguf = {"model": "smollm2-135m", "meta": {"source": {"format": "gguf", "quantization": "Q4_1",
                                                          "weights": "dequantised to float32"}}}
    assert fig_real_model.model_title(gguf, "smollm2-135m") == \
        "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32"
    assert fig_real_model.model_title({"model": "ckpt/gpt2-ln", "meta": {"source": {"format": "hf"}}}, "x") == "gpt2-ln"


def test_png_pdf_and_model_option(results, tmp_path, capsys):
    from PIL import Image

    paths = fig_real_model.cli_main(["--results", str(results), "--out", str(tmp_path), "--model", SLUG])
    assert [p.name for p in paths] == ["fig_real_model.png", "fig_real_model.pdf"]
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    with Image.open(paths[0]) as im:
        assert 7 * 150 <= im.size[0] <= 11 * 150
        assert np.asarray(im.convert("L"), dtype=float).std() > 5  # something was drawn
    assert "fig_real_model: wrote" in capsys.readouterr().out


def test_skips_without_the_model_and_draws_report_only(results, tmp_path, capsys):
    out = tmp_path / "out"
    assert fig_real_model.main(results, out) == []  # default model folder (smollm2-135m) absent
    assert f"fig_real_model: skipped (no report.json under {results / 'models' / fig_real_model.MODEL}/)" \
        in capsys.readouterr().out
    assert not out.exists()

    only = tmp_path / "R" / "models" / fig_real_model.MODEL
    only.mkdir(parents=True)
    shutil.copy(results / "models" / SLUG / "deletion.json", only)  # no report.json: still skipped
    assert fig_real_model.main(tmp_path / "R", out) == []
    assert not out.exists()

    shutil.copy(results / "models" / SLUG / "report.json", only)
    (only / "deletion.json").unlink()
    fig = fig_real_model.build(only)
    notes = [t.get_text() for ax in fig.axes[2:] for t in ax.texts]
    assert any("no deletion.json" in t for t in notes) and any("no horizon.json" in t for t in notes)
    assert len(fig_real_model.main(tmp_path / "R", out)) == 2
