"""Figure scripts (analyses/*.py): every figure is drawn from saved results of tiny checkpoints, inputs that
are absent make a script skip, anything else raises; the shared functions of analyses/common.py against
planted numbers and independent computations."""

from __future__ import annotations

import importlib
import json
import math
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

common = importlib.import_module("common")
all_figures = importlib.import_module("all")
SCRIPTS = all_figures.SCRIPTS
DPI = 150
NEEDS_WEIGHTS = ("fig_weights", "fig_random_gains")
NEEDS_DELETION = ("fig_deletion", "fig_reading", "fig_locality")
REAL_MODEL = "fig_real_model"  # draws one named model folder (tests/test_fig_real_model.py)


def script(name: str):
    return importlib.import_module(name)


# ----------------------------------------------------------------------------------------------
# saved results of two tiny checkpoints (GPT-2 with LayerNorm and its LN-free storage twin)
# ----------------------------------------------------------------------------------------------
def _token_batch(n_seqs: int = 6, seq_len: int = 12):
    from normgrowth.data import TokenBatch

    tokens = torch.from_numpy(np.random.RandomState(3).randint(1, VOCAB, size=(n_seqs, seq_len)))
    tokens[:, 0] = 0  # BOS
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[-1, -3:] = False  # one padded sequence
    return TokenBatch(tokens=tokens, attention_mask=mask, source="random ids")


def _write_model_results(ckpt: Path, root: Path, slug: str, batch) -> dict:
    from normgrowth import collect
    from normgrowth.models import load_model
    from normgrowth.report import report_document
    from normgrowth.storage import atomic_write_json

    model = load_model(str(ckpt))
    res = collect(model, batch)
    out = root / "models" / slug
    atomic_write_json(out / "report.json", report_document(res))
    made = {"results": res, "weights": False, "deletion": False}
    try:
        from normgrowth import weights as W
    except ImportError:
        W = None
    if W is not None:
        atomic_write_json(out / "weights.json", W.analyse_weights(model, results=res, n_seqs=2, seq_len=8).to_json())
        made["weights"] = True
    try:
        from normgrowth.deletion import collect_deletion
    except ImportError:
        collect_deletion = None
    if collect_deletion is not None:
        atomic_write_json(out / "deletion.json", collect_deletion(model, batch, n_boot=50).to_json())
        made["deletion"] = True
    try:
        from normgrowth.horizon import collect_horizon
    except ImportError:
        collect_horizon = None
    if collect_horizon is not None:
        atomic_write_json(out / "horizon.json", collect_horizon(model, batch, horizons="1,2", causal_writes="embed,mlp_out.1",
                                                                n_boot=50).to_json())
    return made


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """``{"root": results dir, "ln": ..., "noln": ...}`` with report/weights/deletion.json for both models."""
    ckpt = tmp_path_factory.mktemp("fig_ckpt")
    root = tmp_path_factory.mktemp("fig_results")
    batch = _token_batch()
    ln = _write_model_results(build_tiny("gpt2", ckpt / "gpt2-ln", seed=0, n_layers=4), root, "gpt2-ln", batch)
    noln = _write_model_results(build_tiny("gpt2", ckpt / "gpt2-free", seed=7, n_layers=4, ln_free=True), root,
                                "gpt2-free", batch)
    from normgrowth.compare import compare_documents
    from normgrowth.results import atomic_write_json

    docs = {slug: {kind: json.loads((root / "models" / slug / f"{kind}.json").read_text())
                   for kind in ("report", "weights", "deletion") if (root / "models" / slug / f"{kind}.json").is_file()}
            for slug in ("gpt2-ln", "gpt2-free")}
    a, b = docs["gpt2-ln"], docs["gpt2-free"]
    atomic_write_json(root / "compare.json", compare_documents(ln["results"], noln["results"], a["report"], b["report"],
                                                               a.get("weights"), b.get("weights"), a.get("deletion"),
                                                               b.get("deletion"), n_boot=100))
    return {"root": root, "ln": ln, "noln": noln}


def _check_outputs(paths: list[Path], stem: str) -> None:
    from matplotlib.image import imread
    from PIL import Image

    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.pdf"]
    png, pdf = paths
    assert png.is_file() and png.stat().st_size > 10_000
    assert pdf.is_file() and pdf.stat().st_size > 1_000
    assert pdf.read_bytes()[:5] == b"%PDF-"
    image = imread(png)
    height, width, channels = image.shape
    assert channels == 4
    assert 7 * DPI <= width <= 11 * DPI  # readable at page width
    assert 2 * DPI <= height <= 14 * DPI
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank page
    with Image.open(png) as im:
        assert im.size == (width, height)
        assert tuple(round(v) for v in im.info["dpi"]) == (DPI, DPI)


# ----------------------------------------------------------------------------------------------
# every figure from the saved results
# ----------------------------------------------------------------------------------------------
def test_every_figure_is_drawn(saved, tmp_path, capsys):
    out = tmp_path / "figures"
    for name in SCRIPTS:
        if name == REAL_MODEL:
            continue
        if name in NEEDS_WEIGHTS and not saved["ln"]["weights"]:
            continue
        if name in NEEDS_DELETION and not saved["ln"]["deletion"]:
            continue
        paths = script(name).main(saved["root"], out)
        _check_outputs(paths, name)
    printed = capsys.readouterr().out
    assert "skipped" not in printed


def test_make_all_runs_every_script(saved, tmp_path):
    out = tmp_path / "all"
    written = all_figures.make_all(saved["root"], out, scripts=("fig_summary",))
    assert sorted(p.name for p in written) == ["fig_summary.pdf", "fig_summary.png"]
    assert all_figures.main(["--results", str(tmp_path / "nothing"), "--out", str(out / "x")]) == 0
    assert not (out / "x").exists()


# ----------------------------------------------------------------------------------------------
# skipping and raising
# ----------------------------------------------------------------------------------------------
def test_missing_inputs_skip_with_a_message(saved, tmp_path, capsys):
    empty = tmp_path / "empty"
    out = tmp_path / "out_empty"
    for name in SCRIPTS:
        assert script(name).main(empty, out) == []
        assert f"{name}: skipped" in capsys.readouterr().out
    assert not out.exists()

    # report.json only (one LN model): the weight, deletion and comparison figures skip, the others draw
    only_report = tmp_path / "only_report"
    (only_report / "models" / "a").mkdir(parents=True)
    shutil.copy(saved["root"] / "models" / "gpt2-ln" / "report.json", only_report / "models" / "a")
    out = tmp_path / "out_report"
    for name in NEEDS_WEIGHTS + NEEDS_DELETION + ("fig_compare",):
        assert script(name).main(only_report, out) == []
        assert f"{name}: skipped" in capsys.readouterr().out
    assert not out.exists()
    assert len(script("fig_summary").main(only_report, out)) == 2


def test_other_errors_raise(saved, tmp_path):
    bad = tmp_path / "bad"
    (bad / "models" / "m").mkdir(parents=True)
    (bad / "models" / "m" / "report.json").write_text('{"model": "m", "ln_free": false}')  # no "sites"
    with pytest.raises(KeyError):
        script("fig_norms").main(bad, tmp_path / "o")
    with pytest.raises(all_figures.FigureError, match="fig_norms"):
        all_figures.make_all(bad, tmp_path / "o", scripts=("fig_norms",))
    assert all_figures.main(["--results", str(bad), "--out", str(tmp_path / "o"), "--only", "fig_norms"]) == 1
    (bad / "models" / "m" / "report.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        script("fig_summary").main(bad, tmp_path / "o")


def test_weights_layout_and_compare_json(saved, tmp_path):
    """weights.json (the WeightsResult layout) is read through its two parts; a compare.json names the pair
    and its Δg."""
    if not saved["ln"]["weights"]:
        pytest.skip("normgrowth.weights not importable")

    root = tmp_path / "r"
    shutil.copytree(saved["root"], root)
    doc = json.loads((root / "models" / "gpt2-ln" / "weights.json").read_text())
    assert common.weight_norms_doc(doc) is doc["weights"] and len(doc["weights"]["layers"]) == 4
    assert common.gains_comparison_doc(doc) is doc["comparison"] and "random_attn_out" in doc["comparison"]
    assert common.weight_norms_doc({"layers": []}) is None  # a flat WeightNorms JSON is not the layout
    assert common.gains_comparison_doc({"weights": doc["weights"], "comparison": None}) is None
    models = common.with_weights(common.discover(root))
    assert {m.slug for m in models if common.gains_comparison_doc(m.weights)} == {"gpt2-ln", "gpt2-free"}
    assert {m.name for m in models} == {m.name for m in common.with_report(common.discover(root))}
    out = tmp_path / "f"

    # the comparison figure draws compare.json's own difference CI (no second approximation)
    compare = json.loads((root / "compare.json").read_text())
    assert compare["growth"]["resid_post"]["difference"]["difference_ci95"][0] is not None
    _check_outputs(script("fig_compare").main(root, out), "fig_compare")


# ----------------------------------------------------------------------------------------------
# shared functions against planted numbers and independent computations
# ----------------------------------------------------------------------------------------------
def test_fit_line_is_the_least_squares_anchor():
    from normgrowth.laws import anchored_exponential

    layers = np.arange(8)
    exact = 3.0 * 1.1 ** layers
    fx, fy = anchored_exponential(exact.tolist(), {"window": [1, 5], "growth_factor": 1.1})
    np.testing.assert_array_equal(fx, np.arange(1, 6))
    np.testing.assert_allclose(fy, exact[1:6], rtol=1e-12)

    noisy = exact * np.exp(np.random.RandomState(0).normal(0, 0.05, size=8))
    slope, intercept = np.polyfit(np.arange(2, 7), np.log(noisy[2:7]), 1)  # the fit's own g and intercept
    fx, fy = anchored_exponential(noisy.tolist(), {"window": [2, 6], "growth_factor": math.exp(slope)})
    np.testing.assert_allclose(np.log(fy), intercept + slope * np.arange(2, 7), rtol=1e-10)


def test_names_rates_and_json_values():
    assert common.display_name("/data/ckpt/gpt2", ln_free=True) == "gpt2 (no LN)"
    assert common.display_name("apollo-research/gpt2_noLN", ln_free=True) == "gpt2_noLN"
    assert common.display_name("/x/zoo/ln/", ln_free=False) == "ln"
    assert common.rate_text({"growth_factor": 1.045, "ci95": [1.04, 1.05]}) == "+4.5 %/layer [+4.0, +5.0]"
    assert common.rate_text({"growth_factor": 0.999, "ci95": [None, None]}) == "-0.10 %/layer"
    np.testing.assert_array_equal(np.isnan(common.arr([1.0, None, 2.0])), [False, True, False])
    lo, hi = common.ci_band([[1, 2], [None, 4]])
    assert lo[0] == 1 and np.isnan(lo[1]) and hi.tolist() == [2, 4]


def test_discover_orders_ln_first_and_keeps_colours(saved):
    models = common.discover(saved["root"])
    assert [m.slug for m in models] == ["gpt2-ln", "gpt2-free"]
    assert [m.ln_free for m in models] == [False, True]
    assert models[1].name.endswith("(no LN)")
    assert models[0].color != models[1].color
    assert [m.color for m in common.discover(saved["root"])] == [m.color for m in models]
