"""Norm removal on a Llama-architecture model (RMSNorm): the stored twin, the control's schedule, the CLI."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import VOCAB, make_tiny, run_main
from normgrowth.errors import NormgrowthError
from normgrowth.zoo import batch_stream
from normgrowth.zoo.twin import TwinSettings, run_twin

SETTINGS = TwinSettings.tiny(steps_per_norm=2, recovery_steps=3, trace_seqs=2)  # trace: 2 of the 4 held-out rows
N_LAYERS = 2
SEP = 0


def _rows(n: int, seed: int) -> torch.Tensor:
    """``n`` rows of SETTINGS.n_ctx random tokens starting with the separator, and a few separators inside."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, VOCAB, (n, SETTINGS.n_ctx), generator=gen)
    rows[:, 0] = SEP
    rows[::3, SETTINGS.n_ctx // 2] = SEP
    return rows


@pytest.fixture(scope="module")
def twin_run():
    model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=True).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train, held = _rows(24, 1), _rows(4, 2)
    result = run_twin(model, train, held, SETTINGS, SEP)
    return result, base, train, held


def _rms_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]


def test_stored_rmsnorm_twin_equals_frozen_scale_model(twin_run):
    """The stored LN-free checkpoint (plain LlamaForCausalLM, eps 1e12) gives the frozen-scale model's logits
    within 1e-5, and each of its 2L + 1 RMSNorms divides by a constant: output = input * w_stored / 1e6
    (checked in float64 numpy from forward hooks), unlike the control's ordinary RMSNorms."""
    result, _, _, held = twin_run
    twin, frozen = result["twin"], result["frozen"]
    assert type(twin).__name__ == "LlamaForCausalLM" and twin.config.rms_norm_eps == 1e12
    with torch.no_grad():
        diff = (twin(held).logits - frozen(held).logits).abs().max()
    assert float(diff) <= 1e-5
    seen: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
        name, (args[0].double().numpy(), out.double().numpy(), mod.weight.detach().double().numpy())))
        for name, m in _rms_norms(twin)]
    with torch.no_grad():
        twin(held)
    for h in handles:
        h.remove()
    assert len(seen) == 2 * N_LAYERS + 1
    for name, (x, y, w) in seen.items():
        np.testing.assert_allclose(y, x * w / 1e6, rtol=1e-5, atol=1e-6, err_msg=name)
    # the control keeps dividing by each token's RMS: its final norm's output has unit RMS / w per token
    ctrl_norm = result["control"].model.norm
    scales = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64).view(3, 1, 1)
    x = torch.randn(3, 5, ctrl_norm.weight.shape[0], dtype=torch.float64) * scales
    with torch.no_grad():
        y = copy.deepcopy(ctrl_norm).double()(x).numpy() / ctrl_norm.weight.double().numpy()  # fixture untouched
    np.testing.assert_allclose(np.sqrt((y ** 2).mean(-1)), 1.0, rtol=1e-4)


def test_stored_weights_are_gains_times_1e6_over_sigma(twin_run):
    """w_stored = w_frozen * 1e6 / sigma_avg for every site, sigma_avg from the record."""
    result, _, _, _ = twin_run
    record, twin, frozen = result["record"], result["twin"], result["frozen"]
    for site in record["sites"]:
        stored = twin.model.get_submodule(site).weight.detach().double()
        gain = frozen.model.get_submodule(site).weight.detach().double()
        torch.testing.assert_close(stored, gain * 1e6 / record["sigma_avg"][site], rtol=1e-6, atol=0.0)


def test_sigma_avg_is_the_mean_rms_of_ordinary_tokens(twin_run):
    """sigma_avg of the first block's attention input norm against numpy: the input is the token embedding,
    so s = sqrt(mean(e^2) + eps) over the ordinary tokens (not position 0, not separators) of the first
    sigma batch of the seeded stream."""
    result, base, train, _ = twin_run
    batch = next(batch_stream(train, SETTINGS.batch_size, SETTINGS.seed)).numpy()
    emb = base["model.embed_tokens.weight"].double().numpy()[batch]
    eps = make_tiny("llama", n_layers=N_LAYERS).config.rms_norm_eps
    s = np.sqrt((emb ** 2).mean(-1) + eps)
    ordinary = batch != SEP
    ordinary[:, 0] = False
    got = result["record"]["sigma_avg"]["layers.0.input_layernorm"]
    assert got == pytest.approx(float(s[ordinary].mean()), rel=1e-5)
    assert result["record"]["sigma_special"]["layers.0.input_layernorm"] == pytest.approx(float(s[~ordinary].mean()),
                                                                                         rel=1e-5)


def test_control_schedule_equals_twin_schedule_and_the_planned_one(twin_run):
    """Twin and control drew the same batches in the same order with the same learning rates, and these are
    the planned ones: the seeded stream's batches (sha256 of the int64 ids), ``steps_per_norm`` steps at the
    constant lr per norm, then the recovery's cosine lr (0.1 + 0.45 (1 + cos(pi s / n))) lr."""
    result, base, train, _ = twin_run
    schedule = result["record"]["schedule"]
    twin, control = schedule["twin"], schedule["control"]
    assert twin["batches"] == control["batches"] and twin["lrs"] == control["lrs"]
    n_sites = 2 * N_LAYERS + 1
    n_rec = SETTINGS.recovery_steps
    expected_lrs = [SETTINGS.lr] * (n_sites * SETTINGS.steps_per_norm) + [
        SETTINGS.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * s / n_rec))) for s in range(n_rec)]
    assert [lr for _, lr in twin["lrs"]] == pytest.approx(expected_lrs, rel=1e-12)
    assert twin["n_steps"] == len(expected_lrs) == result["record"]["fine_tuning_steps"]
    stream = batch_stream(train, SETTINGS.batch_size, SETTINGS.seed)
    n_batches = SETTINGS.sigma_batches + len(expected_lrs)
    planned = [hashlib.sha256(next(stream).to(torch.int64).numpy().tobytes()).hexdigest()[:16]
               for _ in range(n_batches)]
    assert [h for _, h in twin["batches"]] == planned
    assert [p for p, _ in twin["batches"][:SETTINGS.sigma_batches]] == ["sigma"] * SETTINGS.sigma_batches
    # the control trained (its weights moved) and kept its norms
    moved = max(float((v - base[k]).abs().max()) for k, v in result["control"].state_dict().items())
    assert moved > 0
    assert len(_rms_norms(result["control"])) == n_sites


def test_removal_trace_has_a_point_per_norm(twin_run):
    """Base model, one point per removed norm (in the recipe's order) and the recovery, for both runs; both
    start from the same base point."""
    record = twin_run[0]["record"]
    trace = record["ln_removal_trace"]
    sites = [p["site"] for p in trace["twin"]]
    assert sites == ["base model"] + [f"layers.{i}.post_attention_layernorm" for i in range(N_LAYERS)] + [
        f"layers.{i}.input_layernorm" for i in range(N_LAYERS)] + ["norm", "recovery"]
    assert [p["site"] for p in trace["control"]] == sites
    assert trace["twin"][0] == trace["control"][0]
    assert all(math.isfinite(p["heldout_loss"]) and len(p["resid_post_norm"]) == N_LAYERS for p in trace["twin"])
    assert trace["twin"][-1]["heldout_loss"] == pytest.approx(record["twin"]["heldout_loss"], rel=1e-6) or \
        SETTINGS.trace_seqs < SETTINGS.max_heldout_seqs


def test_stored_twin_is_detected_as_ln_free(twin_run, tmp_path):
    """models.load_model on the saved twin: normalization 'none', ln_free, eps 1e12; its logits equal plain HF's."""
    from normgrowth.models import load_model

    result, _, _, held = twin_run
    twin = result["twin"]
    twin.save_pretrained(tmp_path / "twin")
    loaded = load_model(str(tmp_path / "twin"))
    assert loaded.ln_free and loaded.normalization == "none" and not loaded.centers
    assert loaded.config.norm_eps == 1e12
    with torch.no_grad():
        ours = loaded.forward(held[:2]).float()
        plain = twin(held[:2]).logits.float()
    assert float((ours - plain).abs().max()) <= 1e-4


def test_unsupported_architecture_is_refused():
    model = make_tiny("neox", n_layers=1)
    with pytest.raises(NormgrowthError, match="pre-norm architectures"):
        run_twin(model, _rows(8, 3), _rows(2, 4), SETTINGS, SEP)


def test_cli_refuses_a_missing_model_in_one_line(tmp_path, monkeypatch, capsys):
    """Bad input: one line on stderr, exit code 2, no traceback, nothing written."""
    code, _, err = run_main(monkeypatch, capsys, "zoo", "twin", tmp_path / "nothing", "--out", tmp_path / "o")
    assert code == 2, err
    assert "neither a local folder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_fig_real_twin_draws_the_record_and_skips_without_it(twin_run, tmp_path, capsys):
    import importlib
    import sys
    from pathlib import Path

    from normgrowth.storage import atomic_write_json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analyses"))
    fig = importlib.import_module("fig_real_twin")
    assert fig.main(tmp_path / "empty", tmp_path / "figs") == []
    assert "fig_real_twin: skipped" in capsys.readouterr().out
    atomic_write_json(tmp_path / "r" / "real-twin" / "trace.json", twin_run[0]["record"])
    paths = fig.main(tmp_path / "r", tmp_path / "figs")
    assert [p.name for p in paths] == ["fig_real_twin.png", "fig_real_twin.pdf"]
    assert all(p.stat().st_size > 0 for p in paths)


def test_horizon_excess_reads_the_loss_excess_by_n():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analyses"))
    from fig_real_twin import horizon_excess

    doc = {"horizons": [1, 2, 4], "live": {"excess": [0.5, 0.25, 0.0]}, "frozen": {"excess": [0.5, 0.1]}}
    got = horizon_excess(doc)
    assert sorted(got) == ["live"]  # the frozen curve has the wrong length
    np.testing.assert_array_equal(got["live"][0], [1, 2, 4])
    np.testing.assert_allclose(got["live"][1], [50.0, 25.0, 0.0])
    assert horizon_excess({"model": "x"}) == {}


def test_live_special_scale_keeps_outliers_normalised_until_phased_out():
    """Live mode on an RMSNorm, against numpy: at phase 0 a special token (position 0) and an outlier (scale above
    4 sigma_avg) are divided by their own sqrt(mean(x^2) + eps), ordinary tokens by sigma_avg; at phase 1 every
    token by sigma_avg; at phase 1/2 the outlier by sqrt(s * sigma_avg)."""
    from normgrowth.zoo.ln_removal import FrozenLayerNorm

    norm = make_tiny("llama", n_layers=1).model.norm.double()
    eps = norm.variance_epsilon
    w = norm.weight.detach().numpy()
    sigma = 2.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, w.size))
    x[0, 2] *= 40.0  # an outlier: its RMS is about 40 > 4 * sigma
    frozen = FrozenLayerNorm(norm, sigma_avg=sigma, sigma_special=sigma, live=True, outlier_ratio=4.0).double()
    frozen.special = torch.tensor([[True, False, False, False]])
    own = np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    with torch.no_grad():
        y0 = frozen(torch.from_numpy(x)).numpy()
        frozen.phase.fill_(0.5)
        y_half = frozen(torch.from_numpy(x)).numpy()
        frozen.phase.fill_(1.0)
        y1 = frozen(torch.from_numpy(x)).numpy()
    expect0 = np.where(np.array([True, False, True, False])[None, :, None], x / own, x / sigma) * w
    np.testing.assert_allclose(y0, expect0, rtol=1e-6)  # the scale is computed in float32
    np.testing.assert_allclose(y_half[0, 2], x[0, 2] / np.sqrt(own[0, 2] * sigma) * w, rtol=1e-6)
    np.testing.assert_allclose(y1, x / sigma * w, rtol=1e-10)


def test_trace_points_taken_from_the_summaries_are_their_first_rows(twin_run):
    """The trace points read off a summary's evaluation (the base model, the last norm, the finished runs) are
    the first ``trace_seqs`` rows: their mean loss as Hugging Face computes it from labels, and their mean
    resid_post and position-0 norms from HF's hidden states."""
    result, base, _, held = twin_run
    record = result["record"]
    trace = record["ln_removal_trace"]
    rows = held[record["heldout_rows"]["kept"]][: SETTINGS.trace_seqs]
    base_model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=True).eval()
    base_model.load_state_dict(base)

    def check(point: dict, model: nn.Module, data: torch.Tensor) -> None:
        with torch.no_grad():
            losses = [float(model(row[None], labels=row[None]).loss) for row in data]
            hidden = model(data, output_hidden_states=True).hidden_states[1:]  # block outputs (last: normed)
        assert point["heldout_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
        # every block but the last, whose HF hidden state is the final norm's output
        norms = [float(h[:, 1:].double().norm(dim=-1).mean()) for h in hidden[:-1]]
        pos0 = [float(h[:, 0].double().norm(dim=-1).mean()) for h in hidden[:-1]]
        np.testing.assert_allclose(point["resid_post_norm"][:-1], norms, rtol=1e-5, atol=1e-5)  # stored to 5 decimals
        np.testing.assert_allclose(point["pos0_norm"][:-1], pos0, rtol=1e-5, atol=1e-5)

    assert SETTINGS.trace_seqs < len(record["heldout_rows"]["kept"])
    check(trace["twin"][0], base_model, held[: SETTINGS.trace_seqs])
    check(trace["twin"][-1], result["twin"], rows)
    check(trace["control"][-1], result["control"], rows)


def test_after_freezing_summaries_and_recovery_trace(twin_run):
    """After the last norm (special scales still live) twin and control are summarised on the held-out rows;
    the recovery records ``[step, phase (step / n), training loss]`` for each of its steps."""
    record = twin_run[0]["record"]
    assert record["twin_built"] is True and record["diverged"] is None
    assert set(record["after_freezing"]) == {"twin", "control"}
    for summary in record["after_freezing"].values():
        assert math.isfinite(summary["heldout_loss"]) and len(summary["pos0_norm"]) == N_LAYERS
    assert record["after_freezing_twin_minus_control_loss"] == pytest.approx(
        record["after_freezing"]["twin"]["heldout_loss"] - record["after_freezing"]["control"]["heldout_loss"])
    # per-row held-out losses: each row's mean next-token loss as Hugging Face computes it from labels
    result, _, _, held = twin_run
    with torch.no_grad():
        hf_rows = [float(result["control"](row[None], labels=row[None]).loss) for row in held]
    np.testing.assert_allclose(record["control"]["heldout_loss_per_row"], hf_rows, rtol=1e-5)
    assert record["control"]["heldout_loss"] == pytest.approx(np.mean(hf_rows), rel=1e-5)
    assert record["control"]["heldout_loss_median_row"] == pytest.approx(np.median(hf_rows), rel=1e-5)
    n = SETTINGS.recovery_steps
    assert [(s, ph) for s, ph, _ in record["recovery_trace"]] == [(s, s / n) for s in range(1, n + 1)]
    assert all(math.isfinite(loss) for _, _, loss in record["recovery_trace"])
    # the scale penalty (on by default) is recorded at every step of both runs
    penalties = record["scale_penalty_trace"]
    assert set(penalties) == {"twin", "control"}
    for values in penalties.values():
        assert len(values) == record["fine_tuning_steps"] and all(v >= 0 and math.isfinite(v) for v in values)
    from normgrowth.zoo.twin import recipe_text

    assert "relu(ln(s / sigma_avg) - ln 1.5)^2" in recipe_text(SETTINGS, 2 * N_LAYERS + 1)["scale_penalty"]
    assert recipe_text(TwinSettings.tiny(scale_penalty=0.0), 5)["scale_penalty"] is None


def test_a_diverging_recovery_stores_no_twin_and_stops_the_control_before_its_recovery(monkeypatch):
    """A recovery whose loss becomes NaN at its second step (planted in the training loop): no twin, the
    divergence recorded with its phase, the control trained on exactly the twin's steps before the recovery
    and not through a recovery of its own."""
    from normgrowth.errors import TrainingDiverged
    from normgrowth.zoo import ln_removal

    real = ln_removal.train_steps
    labels = []

    def diverging(model, opt, batches, n_steps, lr_at, progress=None, label="", *args, **kwargs):
        labels.append(label)
        if label == "norm-free recovery":
            kwargs["losses"].append(3.0)  # the first step's loss, then NaN before the second step's update
            lr_at(0), lr_at(1), next(batches), next(batches)
            raise TrainingDiverged(float("nan"), 2, n_steps, label)
        return real(model, opt, batches, n_steps, lr_at, progress, label, *args, **kwargs)

    monkeypatch.setattr(ln_removal, "train_steps", diverging)
    model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=True).eval()
    result = run_twin(model, _rows(24, 1), _rows(4, 2), SETTINGS, SEP)
    record = result["record"]
    assert result["twin"] is None and record["twin_built"] is False and record["twin"] is None
    assert record["diverged"] == {"step": 2, "of": SETTINGS.recovery_steps, "phase": 2 / SETTINGS.recovery_steps,
                                  "loss": pytest.approx(float("nan"), nan_ok=True),
                                  "reason": "non-finite training loss after 0 skipped steps"}
    assert record["recovery_trace"] == [[1, 1 / SETTINGS.recovery_steps, 3.0]]
    assert "control recovery" not in labels and labels.count("norm-free recovery") == 1
    schedule = record["schedule"]
    n_before = (2 * N_LAYERS + 1) * SETTINGS.steps_per_norm
    assert schedule["twin"] == schedule["control"] and schedule["twin"]["n_steps"] == n_before
    assert not any(phase == "recovery" for phase, _ in schedule["control"]["batches"])
    assert set(record["after_freezing"]) == {"twin", "control"} and record["twin_minus_control_loss"] is None


def test_a_divergence_before_the_recovery_is_an_error(monkeypatch):
    from normgrowth.errors import TrainingDiverged
    from normgrowth.zoo import ln_removal

    def diverging(model, opt, batches, n_steps, lr_at, progress=None, label="", *args, **kwargs):
        raise TrainingDiverged(float("inf"), 1, n_steps, label)

    monkeypatch.setattr(ln_removal, "train_steps", diverging)
    model = make_tiny("llama", n_layers=N_LAYERS, tie_word_embeddings=True).eval()
    with pytest.raises(TrainingDiverged, match="the training loss became inf at step 1"):
        run_twin(model, _rows(24, 1), _rows(4, 2), SETTINGS, SEP)


def test_fig_real_twin_draws_a_diverged_record(twin_run, tmp_path):
    """A record without a finished twin (twin-failed.json copied to trace.json) still gives the figure."""
    import importlib
    import sys
    from pathlib import Path

    from normgrowth.storage import atomic_write_json

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analyses"))
    fig = importlib.import_module("fig_real_twin")
    record = copy.deepcopy(twin_run[0]["record"])
    record.update(twin=None, twin_built=False, diverged={"step": 2, "of": 3, "phase": 2 / 3, "loss": float("nan")})
    record["recovery_trace"] = record["recovery_trace"][:1]
    for name in ("twin", "control"):
        record["ln_removal_trace"][name] = record["ln_removal_trace"][name][:-1]  # no point after a recovery
    atomic_write_json(tmp_path / "r" / "real-twin" / "trace.json", record)
    paths = fig.main(tmp_path / "r", tmp_path / "figs")
    assert [p.name for p in paths] == ["fig_real_twin.png", "fig_real_twin.pdf"]
