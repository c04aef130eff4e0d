"""normgrowth sweep: checkpoint expansion and ordering, per-point fits equal to the report's, caching and resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import VOCAB, build_tiny, run_main
from normgrowth.errors import NormgrowthError
from normgrowth.pipeline import run_sweep
from normgrowth.sweep import SweepResult, expand_checkpoints, fit_series, step_of


def _config_only(path: Path, n_layer: int = 2, model_type: str = "gpt2") -> Path:
    """A folder with only a config.json (enough for expanding a sweep, not for running it)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "n_layer": n_layer, "n_embd": 32}))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Three different tiny 4-layer GPT-2 checkpoints named so that text order is not step order."""
    root = tmp_path_factory.mktemp("sweep") / "run"
    for seed, step in enumerate((10, 9, 0)):
        build_tiny("gpt2", root / f"step-{step}", seed=seed, n_layers=4)
    return root


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep_data") / "ids.npy"
    np.save(path, np.random.RandomState(11).randint(1, VOCAB, size=(6, 12)))
    return path


# ----- expansion ---------------------------------------------------------------------------------
def test_step_names():
    assert [step_of(n) for n in ("step-10", "step512", "checkpoint-3", "steps-1", "step-", "main")] == \
        [10, 512, 3, None, None, None]


def test_parent_folder_points_are_in_step_order(tmp_path):
    for name in ("step-10", "step9", "checkpoint-100", "step-2", "notes"):
        _config_only(tmp_path / name)
    (tmp_path / "README").write_text("not a checkpoint")
    points = expand_checkpoints([str(tmp_path)])
    assert [p.step for p in points] == [2, 9, 10, 100]
    assert [Path(p.checkpoint).name for p in points] == ["step-2", "step9", "step-10", "checkpoint-100"]
    assert {p.series for p in points} == {str(tmp_path)} and all(p.revision is None for p in points)


def test_single_checkpoints_keep_argument_order_and_hub_revisions_sort_by_step(tmp_path):
    a = _config_only(tmp_path / "step-7")
    b = _config_only(tmp_path / "final")
    points = expand_checkpoints([str(b), str(a)])
    assert [(Path(p.checkpoint).name, p.step) for p in points] == [("final", None), ("step-7", 7)]
    hub = expand_checkpoints(["org/model"], ["step1000", "step0", "step512"])
    assert [(p.revision, p.step) for p in hub] == [("step0", 0), ("step512", 512), ("step1000", 1000)]
    named = expand_checkpoints(["org/model"], ["main", "step0"])  # not all steps: the order given
    assert [(p.revision, p.step) for p in named] == [("main", None), ("step0", 0)]


@pytest.mark.parametrize("layout, message", [
    ({}, "no checkpoints in"),
    ({"step-1": ("gpt2", 2), "step-2": ("gpt2", 3)}, "different architectures"),
    ({"step-1": ("gpt2", 2), "step1": ("gpt2", 2)}, "both name step 1"),
])
def test_bad_folders_are_one_sentence_errors(tmp_path, layout, message):
    (tmp_path / "empty").mkdir()
    for name, (model_type, n_layer) in layout.items():
        _config_only(tmp_path / "empty" / name, n_layer, model_type)
    with pytest.raises(NormgrowthError, match=message):
        expand_checkpoints([str(tmp_path / "empty")])


def test_revisions_with_a_local_folder_are_refused(tmp_path):
    _config_only(tmp_path / "step-1")
    with pytest.raises(NormgrowthError, match="hub models"):
        expand_checkpoints([str(tmp_path)], ["step0"])


def test_cli_no_checkpoints_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "sweep.json"
    code, _, err = run_main(monkeypatch, capsys, "sweep", tmp_path / "empty", "--json", out)
    assert code == 2, err
    assert err.startswith("error: no checkpoints in") and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ----- running a sweep ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(run_dir, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep_cache")
    return run_sweep(str(run_dir), str(tokens), batch_size=4, out=out), out


def test_sweep_fits_equal_the_report_on_each_checkpoint(swept, run_dir, tokens):
    """Every point's fits equal, key by key, those that `normgrowth report --json` writes for that
    checkpoint on the same data (computed here afresh, without the sweep's cache)."""
    run, _ = swept
    doc = json.loads(json.dumps(run.document()))
    assert [p["step"] for p in doc["points"]] == [0, 9, 10]
    growth = []
    for point in doc["points"]:
        from typer.testing import CliRunner

        from normgrowth.cli import app

        out = Path(point["checkpoint"]).parent.parent / f"report-{point['step']}.json"
        result = CliRunner().invoke(app, ["report", point["checkpoint"], "--data", str(tokens), "--batch-size", "3",
                                          "--json", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        report = json.loads(out.read_text())
        assert point["fit"] == report["fit"]
        assert set(point["fit"]) == {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
        assert point["n_tokens"] == report["n_tokens"] and point["n_layers"] == 4
        growth.append(point["fit"]["resid_post"]["growth_factor"])
    assert len(set(growth)) == 3  # three different checkpoints, three different fits


def test_sweep_weight_fits_equal_the_weights_command(swept):
    from normgrowth.pipeline import run_weights

    run, _ = swept
    for point in run.result.points:
        w = run_weights(point["checkpoint"], random_inputs=False).result.norms.to_json()["fit"]
        assert point["weight_fit"] == json.loads(json.dumps(w, default=str))
        assert "W_OV_mean" in point["weight_fit"]
        assert "deletion" in point and set(point["deletion"]) == {"verdict"}


def test_sweep_is_cached_and_loads_no_model_the_second_time(swept, run_dir, tokens, monkeypatch):
    run, out = swept
    assert run.cached == [False, False, False]
    import normgrowth.models

    def refuse(*args, **kwargs):
        raise AssertionError("a cached sweep must not load a model")

    monkeypatch.setattr(normgrowth.models, "load_model", refuse)
    again = run_sweep(str(run_dir), str(tokens), batch_size=4, out=out)
    assert again.cached == [True, True, True]
    assert json.dumps(again.document()) == json.dumps(json.loads(json.dumps(run.document())))


def test_interrupted_sweep_resumes_where_it_stopped(swept, run_dir, tokens, tmp_path, monkeypatch):
    """The third point raises midway (after its collection); rerun: the first two points come from the cache,
    the third is finished from its cached collection, and no point is lost or duplicated: the resumed sweep
    equals the uninterrupted one (``swept``, computed in another cache folder)."""
    import normgrowth.models
    import normgrowth.pipeline as pipeline

    real_load, real_deletion = normgrowth.models.load_model, pipeline._deletion
    loads: list[str] = []

    def counting_load(spec, *args, **kwargs):
        loads.append(Path(spec).name)
        return real_load(spec, *args, **kwargs)

    def failing_deletion(spec, *args, **kwargs):
        if Path(spec).name == "step-10":
            raise RuntimeError("killed")
        return real_deletion(spec, *args, **kwargs)

    monkeypatch.setattr(normgrowth.models, "load_model", counting_load)
    monkeypatch.setattr(pipeline, "_deletion", failing_deletion)
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(str(run_dir), str(tokens), batch_size=4, out=tmp_path)
    assert loads == ["step-0", "step-9", "step-10"]
    assert len(list(tmp_path.glob("sweep_point-*.json"))) == 2
    assert len(list(tmp_path.glob("report-step-10-*.json"))) == 1  # its collection was saved before the failure

    monkeypatch.setattr(pipeline, "_deletion", real_deletion)
    loads.clear()
    notes: list[str] = []
    resumed = run_sweep(str(run_dir), str(tokens), batch_size=4, out=tmp_path,
                        progress=lambda e: notes.append(e.text) if e.kind == "note" else None)
    assert resumed.cached == [True, True, False]
    assert loads == ["step-10"]  # only the unfinished point loads its model (for the weights and deletion)
    assert any("reusing cached result" in n and "report-step-10" in n for n in notes)
    assert [p["step"] for p in resumed.result.points] == [0, 9, 10]
    uninterrupted, _ = swept
    assert json.loads(json.dumps(uninterrupted.document()["points"])) == resumed.document()["points"]


def test_sweep_result_protocol(swept, tmp_path):
    run, _ = swept
    path = run.result.save(tmp_path / "sweep")
    loaded = SweepResult.load(path)
    saved = json.loads(path.read_text())
    assert saved["result_kind"] == "sweep" and loaded.to_json()["points"] == saved["points"]
    assert [p["step"] for p in loaded.points] == [0, 9, 10]
    frame = loaded.to_frame()
    rows = frame[(frame.site == "resid_post") & (frame.statistic == "growth_factor") & (frame.source == "fit")]
    assert list(rows.step) == [0, 9, 10]
    assert list(rows.value) == [p["fit"]["resid_post"]["growth_factor"] for p in loaded.points]
    series = fit_series(loaded.points, "resid_post")
    assert list(series["step"]) == [0, 9, 10]
    assert np.all(series["lo"] <= series["g"]) and np.all(series["g"] <= series["hi"])
    assert "step" in loaded.summary() and "resid_post" in loaded.summary()


# ----- figure ------------------------------------------------------------------------------------
def _analyses(name: str):
    import importlib

    folder = str(Path(__file__).resolve().parents[1] / "analyses")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def test_fig_training_draws_each_series_in_step_order(swept, tmp_path, capsys):
    from matplotlib.image import imread

    run, _ = swept
    results = tmp_path / "results"
    results.mkdir()
    (results / "sweep.json").write_text(json.dumps(run.document()))
    fig = _analyses("fig_training")
    series = fig.sweep_series(results)
    assert len(series) == 1 and [p["step"] for p in series[0][1]] == [0, 9, 10]
    paths = fig.main(results, tmp_path / "figures")
    assert [p.name for p in paths] == ["fig_training.png", "fig_training.pdf"]
    assert imread(paths[0])[..., :3].std() > 0.05
    assert fig.main(tmp_path / "nothing", tmp_path / "figures") == []  # no sweep: skipped with a note
    assert "fig_training: skipped" in capsys.readouterr().out


def test_cli_sweep_prints_step_order_and_writes_the_json(swept, run_dir, tokens, tmp_path):
    from typer.testing import CliRunner

    from normgrowth.cli import app

    run, out = swept
    path = tmp_path / "sweep.json"
    result = CliRunner().invoke(app, ["sweep", str(run_dir), "--data", str(tokens), "--batch-size", "4", "--out",
                                      str(out), "--json", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:] if line.strip()]
    assert rows == ["0", "9", "10"]
    assert json.loads(path.read_text())["points"] == json.loads(json.dumps(run.document()))["points"]
