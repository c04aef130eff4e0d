"""The pipeline layer (settings, cache, run_* functions) without the CLI, and the result protocol of Results and
WeightsResult: frames against the saved JSON, Results.fit against the report and an independent fit, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import VOCAB, build_tiny
from normgrowth.errors import NormgrowthError
from normgrowth.fit import fit_site
from normgrowth.storage import json_safe
from normgrowth.pipeline import Event, RunSettings, run_deletion, run_report, run_weights



class Recorder:
    """A progress callback that keeps every event."""

    def __init__(self):
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def notes(self) -> list[str]:
        return [e.text for e in self.events if e.kind == "note"]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory) -> Path:
    return build_tiny("gpt2", tmp_path_factory.mktemp("pipe") / "gpt2", seed=3, n_layers=4)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe_data") / "ids.npy"
    np.save(path, np.random.RandomState(5).randint(1, VOCAB, size=(6, 12)))
    return path


@pytest.fixture(scope="module")
def report_run(four_layer, tokens):
    return run_report(str(four_layer), str(tokens), batch_size=4)


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
def test_settings_validate_in_one_sentence_and_round_trip():
    s = RunSettings(data="x.npy", n_seqs=4, batch_size="auto", out=Path("cache"))
    assert s.batch_size is None and s.out == "cache"
    assert RunSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert RunSettings(batch_size="3").batch_size == 3
    for kwargs, message in (({"batch_size": "0"}, "--batch-size must be a positive integer or 'auto'"),
                            ({"n_seqs": 0}, "n_seqs must be a positive integer"),
                            ({"seq_len": 2.5}, "seq_len must be a positive integer"),
                            ({"dtype": None}, "dtype must be a name")):
        with pytest.raises(NormgrowthError, match=message) as err:
            RunSettings(**kwargs)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    with pytest.raises(NormgrowthError, match="unknown run setting"):
        RunSettings.from_json({"n_seq": 3})


# ----------------------------------------------------------------------------------------------
# cache hits and misses through the pipeline
# ----------------------------------------------------------------------------------------------
def test_report_cache_hit_and_miss_by_settings(four_layer, tokens, tmp_path, capsys):
    data = tmp_path / "ids.npy"
    data.write_bytes(tokens.read_bytes())
    out = tmp_path / "cache"
    rec = Recorder()
    first = run_report(str(four_layer), str(data), batch_size=4, out=out, progress=rec)
    assert not first.cached and first.model is not None
    assert rec.kinds()[0] == "start" and rec.kinds()[-2:] == ["end", "note"]
    advances = [e for e in rec.events if e.kind == "advance"]
    assert [(e.done, e.total) for e in advances] == [(4, 6), (6, 6)]
    assert rec.notes() == [f"saved {first.cache_path}.json"]
    printed = capsys.readouterr()  # the pipeline prints nothing itself (transformers may draw its loading bar)
    assert printed.out == "" and "saved" not in printed.err and "collecting" not in printed.err

    rec = Recorder()
    again = run_report(str(four_layer), str(data), batch_size=2, out=out, progress=rec)  # batch size: no new key
    assert again.cached and again.model is None and again.cache_path == first.cache_path
    assert rec.notes() == [f"reusing cached result {first.cache_path}.json"] and rec.kinds() == ["note"]
    for key, arr in first.results.arrays().items():
        np.testing.assert_array_equal(again.results.arrays()[key], arr, err_msg=key)
    assert again.document()["fit"] == json.loads(json.dumps(first.document()["fit"]))

    fewer = run_report(str(four_layer), str(data), n_seqs=3, out=out)
    assert not fewer.cached and fewer.cache_path != first.cache_path and fewer.results.meta.n_seqs == 3
    np.save(data, np.random.RandomState(6).randint(1, VOCAB, size=(6, 12)))  # same path, new content
    changed = run_report(str(four_layer), str(data), out=out)
    assert not changed.cached and changed.cache_path not in (first.cache_path, fewer.cache_path)
    assert len(list(out.glob("report-*.json"))) == len(list(out.glob("report-*.npz"))) == 3

    # a torn entry (npz replaced after the JSON was written) is recomputed, not read
    np.savez(Path(f"{first.cache_path}.npz"), junk=np.zeros(1))
    np.save(data, np.load(tokens))
    redo = run_report(str(four_layer), str(data), batch_size=4, out=out)
    assert not redo.cached and redo.cache_path == first.cache_path
    np.testing.assert_array_equal(redo.results.sites["resid_post"].mean, first.results.sites["resid_post"].mean)
    assert run_report(str(four_layer), str(data), out=out).cached  # rewritten whole, so readable again


def test_weights_and_deletion_cache(four_layer, tokens, tmp_path):
    out = tmp_path / "cache"
    kw = dict(batch_size=4, out=out, random_seqs=2, random_len=8)
    first = run_weights(str(four_layer), str(tokens), **kw)
    assert not first.cached and first.report is not None and not first.report.cached
    assert first.result.comparison is not None
    rec = Recorder()
    again = run_weights(str(four_layer), str(tokens), progress=rec, **kw)
    assert again.cached and again.report is None  # nothing collected or loaded on a hit
    assert rec.notes() == [f"reusing cached result {first.cache_path}.json"]
    assert again.document() == json.loads(json.dumps(first.document()))
    assert again.text() == first.text()
    other = run_weights(str(four_layer), str(tokens), **{**kw, "random_len": 9})
    assert not other.cached and other.report.cached  # the collection is shared, the weights are not
    no_data = run_weights(str(four_layer), None, **kw)
    assert not no_data.cached and no_data.result.comparison is None and no_data.report is None

    d1 = run_deletion(str(four_layer), str(tokens), batch_size=4, out=out, ablate="none")
    d2 = run_deletion(str(four_layer), str(tokens), batch_size=4, out=out, ablate=None)
    assert not d1.cached and d2.cached and d2.doc == d1.doc
    assert not (d1.doc.get("ablation") or {}).get("writes") and d2.text() == d1.text()  # printed from the JSON
    d3 = run_deletion(str(four_layer), str(tokens), batch_size=4, out=out, ablate="0")
    assert not d3.cached and d3.cache_path != d1.cache_path and d3.doc["ablation"]["writes"]


def test_cli_passes_settings_to_the_pipeline_and_writes_only_its_json(tmp_path, monkeypatch):
    """cli.py only parses and prints: each command hands every setting to its run_* function unchanged, and
    writes nothing but the --json file (the cache directory is the pipeline's alone)."""
    from typer.testing import CliRunner

    import normgrowth.pipeline as pipeline
    from normgrowth.cli import app

    seen: dict[str, tuple] = {}

    class Stub:
        def text(self) -> str:
            return "printed"

        def document(self) -> dict:
            return {"stub": True}

    def stub(name):
        def run(*args, **kwargs):
            kwargs.pop("progress")
            seen[name] = (args, kwargs)
            return Stub()
        return run

    for name in ("run_report", "run_weights", "run_deletion", "run_compare", "run_sweep"):
        monkeypatch.setattr(pipeline, name, stub(name))
    out = tmp_path / "cache"
    common = ["--data", "d.npy", "--n-seqs", "5", "--seq-len", "7", "--batch-size", "3", "--dtype", "bfloat16",
              "--out", str(out), "--device-map", "auto", "--checkpoint-every", "4", "--revision", "r1"]
    for command, args in (("report", ["m"]), ("weights", ["m"]), ("deletion", ["m"]), ("compare", ["a", "b"]),
                          ("sweep", ["m"])):
        result = CliRunner().invoke(app, [command, *args, *common, "--json", str(tmp_path / f"{command}.json")],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "printed" in result.output
        assert json.loads((tmp_path / f"{command}.json").read_text()) == {"stub": True}
    expected = dict(data="d.npy", n_seqs=5, seq_len=7, batch_size="3", dtype="bfloat16", out=out, device_map="auto",
                    checkpoint_every=4, revision="r1")
    for name, (args, kwargs) in seen.items():
        given = {**kwargs, **({"data": args[-1]} if args[-1] == "d.npy" else {})}
        assert {k: given.get(k) for k in expected} == expected, name
    assert seen["run_compare"][0][:2] == ("a", "b")
    assert not out.exists()  # the stubs computed nothing, and the CLI wrote nothing there


# ----------------------------------------------------------------------------------------------
# Results: fit, frame, save / load
# ----------------------------------------------------------------------------------------------
def test_results_fit_equals_report_and_an_independent_fit(report_run):
    from normgrowth.report import report_document

    res = report_run.results
    for window in (None, "1:-1"):
        doc = report_document(res, window)
        for site, st in res.sites.items():
            if st is None:
                continue
            fit = fit_site(res, site, window)
            assert fit.to_json() == doc["fit"][site]
            # the point estimate is the log-linear slope of the token mean curve over the window
            a, b = fit.window
            layers = np.arange(a, b + 1)
            slope = np.polyfit(layers, np.log(np.asarray(st.mean, dtype=np.float64)[a:b + 1]), 1)[0]
            assert fit.growth_factor == pytest.approx(np.exp(slope), rel=1e-5)
    assert report_run.document()["fit"] == {s: f.to_json() for s, f in report_run.fits.items()}
    with pytest.raises(NormgrowthError, match="no 'nope' statistics"):
        fit_site(res, "nope")


def test_results_frame_matches_saved_json(report_run, tmp_path):
    res = report_run.results
    doc = json.loads(res.save(tmp_path / "r").read_text())
    frame = res.to_frame()
    assert list(frame.columns[:5]) == ["model", "site", "layer", "statistic", "value"]
    assert set(frame["model"]) == {doc["model"]}

    def column(site: str, stat: str) -> list:
        rows = frame[(frame.site == site) & (frame.statistic == stat)].sort_values("layer")
        assert rows["layer"].tolist() == list(range(len(rows)))
        return rows["value"].tolist()

    for site, stats in doc["sites"].items():
        for stat in ("mean", "std", "centered_mean", "median", "bos_mean", "bos_centered_mean"):
            assert column(site, stat) == pytest.approx(stats[stat], rel=1e-6)
    assert column("embed", "mean") == pytest.approx(doc["embed"]["embed"]["mean"], rel=1e-6)
    assert column("mlp_pre", "act_rate") == pytest.approx(doc["mlp_act_rate"], rel=1e-6)
    heads = frame[(frame.site == "heads") & (frame.statistic == "mean")]
    table = np.full((doc["n_layers"], len(doc["heads"]["mean"][0])), np.nan)
    table[heads["layer"].astype(int), heads["head"].astype(int)] = heads["value"]
    np.testing.assert_allclose(table, doc["heads"]["mean"], rtol=1e-6)
    assert repr(res).startswith(f"<Results: {doc['model']}")


def test_results_load_is_compatible_and_detects_torn_writes(report_run, tmp_path):
    from normgrowth.results import Results

    res = report_run.results
    path = res.save(tmp_path / "r")
    doc = json.loads(path.read_text())
    assert doc["result_kind"] == "collection" and doc["arrays"]["file"] == "r.npz"
    del doc["result_kind"]  # a file written before the result protocol
    path.write_text(json.dumps(doc))
    back = Results.load(tmp_path / "r")
    assert back.to_json() == json.loads(json.dumps(res.to_json()))
    assert back.to_frame().equals(res.to_frame())
    np.savez(tmp_path / "r.npz", junk=np.zeros(1))
    with pytest.raises(NormgrowthError, match="does not match its .npz"):
        Results.load(path)
    (tmp_path / "r.npz").unlink()
    with pytest.raises(NormgrowthError, match="does not match its .npz"):
        Results.load(path)


# ----------------------------------------------------------------------------------------------
# WeightsResult
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights_run(four_layer, tokens):
    return run_weights(str(four_layer), str(tokens), batch_size=4, random_seqs=2, random_len=8)


def test_weights_result_round_trip_and_torn_npz(weights_run, tmp_path):
    from normgrowth.weights import WeightsResult

    wr = weights_run.result
    path = wr.save(tmp_path / "w")
    back = WeightsResult.load(path)
    assert back.to_json() == json.loads(json.dumps(wr.to_json()))
    np.testing.assert_array_equal(back.norms.W_OV_heads, wr.norms.W_OV_heads)
    assert back.comparison["fit"]["random_attn_out"].growth_factor == wr.comparison["fit"]["random_attn_out"].growth_factor
    assert back.to_frame().equals(wr.to_frame())
    np.savez(tmp_path / "w.npz", W_OV_heads=np.zeros((4, 4)))
    with pytest.raises(NormgrowthError, match="does not match its .npz"):
        WeightsResult.load(path)
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(wr.norms.to_json()))  # a bare WeightNorms JSON is not a weights result
    with pytest.raises(NormgrowthError, match="no \"weights\" object"):
        WeightsResult.load(flat)
    with pytest.raises(NormgrowthError, match="holds a 'weights' result, not 'collection'"):
        from normgrowth.results import Results

        Results.load(path.with_name("w.json"))


def test_weights_frame_matches_saved_json(weights_run, tmp_path):
    wr = weights_run.result
    doc = json.loads(wr.save(tmp_path / "w").read_text())
    frame = wr.to_frame()

    def column(site: str, stat: str) -> list:
        rows = frame[(frame.site == site) & (frame.statistic == stat)].sort_values("layer")
        return rows["value"].tolist()

    layers = doc["weights"]["layers"]
    for site, key in (("mlp", "W_out"), ("mlp", "W_in"), ("attn", "W_Q"), ("attn", "b_O"), ("attn", "gain_attn")):
        assert column(site, key) == pytest.approx([row[key] for row in layers], rel=1e-12)
    assert column("attn", "W_OV_mean") == pytest.approx([np.mean(row["W_OV_heads"]) for row in layers], rel=1e-12)
    ov = frame[(frame.site == "attn") & (frame.statistic == "W_OV")]
    assert len(ov) == sum(len(row["W_OV_heads"]) for row in layers)
    assert column("attn_out", "random_input_norm") == pytest.approx(doc["random_inputs"]["attn_out"], rel=1e-12)
    assert column("mlp_out", "real_to_random") == pytest.approx(doc["comparison"]["ratio_mlp"], rel=1e-12)
    assert frame[frame.site == "final_norm"]["value"].tolist() == pytest.approx([doc["weights"]["gain_final"]])
    assert "W_gate" not in set(frame.statistic)  # absent from GPT-2: no rows rather than NaN rows
    assert wr.summary().startswith(f"weight norms of {doc['model']}")


# ----------------------------------------------------------------------------------------------
# one shape for every run
# ----------------------------------------------------------------------------------------------
def test_every_run_takes_the_settings_and_has_the_protocol(four_layer, tokens, tmp_path):
    """Every run_* accepts RunSettings.as_kwargs(); every run has text(), to_json(), to_frame(), summary() and
    save / load, the loaded run giving the same document and frame."""
    from normgrowth.pipeline import RunProtocol, run_compare, run_sweep

    settings = RunSettings(data=str(tokens), batch_size=4, out=str(tmp_path / "cache"), checkpoint_every=2)
    model = str(four_layer)
    runs = {"report": run_report(model, **settings.as_kwargs()),
            "weights": run_weights(model, **settings.as_kwargs(), random_seqs=2, random_len=8),
            "deletion": run_deletion(model, **settings.as_kwargs(), ablate=None),
            "compare": run_compare(model, model, **settings.as_kwargs()),
            "sweep": run_sweep(model, **settings.as_kwargs())}
    for name, run in runs.items():
        assert isinstance(run, RunProtocol), name
        assert run.to_json() == run.document() and run.text() and run.summary()
        frame = run.to_frame()
        assert len(frame) > 0 and list(frame.columns[:5]) == ["model", "site", "layer", "statistic", "value"], name
        saved = run.save(tmp_path / name)
        back = type(run).load(saved)
        assert json_safe(back.document()) == json_safe(run.document()), name
        assert back.to_frame().equals(frame), name
    # the deletion frame holds the JSON's matrices entry by entry
    doc, frame = runs["deletion"].doc, runs["deletion"].to_frame()
    rows = frame[(frame.statistic == "retention") & (frame.site == doc["writes"][0])]
    expected = [v[0] for v in doc["retention"] if v[0] is not None]
    assert rows.sort_values("layer")["value"].tolist() == pytest.approx(expected)
    assert all(rows["distance"] == rows["layer"] - doc["write_layer"][0])


def test_sweep_revision_is_one_revision_for_every_checkpoint(four_layer, tokens):
    from normgrowth.pipeline import run_sweep

    with pytest.raises(NormgrowthError, match="either revision"):
        run_sweep("gpt2", str(tokens), revision="step1", revisions="step2")
    with pytest.raises(NormgrowthError, match="--revisions applies to hub models"):
        run_sweep(str(four_layer), str(tokens), revision="step1")  # a local folder has no revisions


def test_cli_prints_each_warning_once_on_one_line(capsys, monkeypatch):
    import warnings

    from normgrowth import cli

    monkeypatch.setattr(cli, "_main_process", lambda: True)
    show = cli._warning_printer()
    for _ in range(3):
        show(UserWarning("only 4 sequences feed\n  the bootstrap"), UserWarning, "x.py", 1)
    show(UserWarning("another"), UserWarning, "y.py", 2)
    assert capsys.readouterr().err == "warning: only 4 sequences feed the bootstrap\nwarning: another\n"
    monkeypatch.setattr(warnings, "showwarning", show)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        for line in (1, 2):  # two places, one text: one line
            warnings.warn_explicit("same text", UserWarning, "z.py", line)
    assert capsys.readouterr().err == "warning: same text\n"


def test_a_named_model_on_builtin_data_defaults_to_its_own_data_size():
    """smollm2-135m (30 layers) defaults to 128 x 256 built-in tokens; explicit sizes, other data and other
    models keep what was given."""
    from normgrowth.pipeline import _settings

    def sizes(model, data="builtin", n_seqs=None, seq_len=None):
        s = _settings(data, n_seqs, seq_len, 8, None, "float32", None, None, None, None, model=model)
        return s.n_seqs, s.seq_len

    assert sizes("smollm2-135m") == (128, 256)
    assert sizes("SmolLM2-135M", n_seqs=16) == (16, 256)
    assert sizes("smollm2-135m", data="prompts") == (None, None)
    assert sizes("path/to/checkpoint") == (None, None)
