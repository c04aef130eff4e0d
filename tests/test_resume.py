"""Runs that survive a kill: collector checkpoints, resume, and identity checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import VOCAB, build_tiny, run_main

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI with NormCollector.end_batch patched to SIGKILL the process once batch KILL_AFTER_BATCH + 1
# has been folded in: a deterministic hard kill midway through a collection (no cleanup code runs).
KILLER = """
import os, signal, sys
from normgrowth import collector
limit = int(os.environ["KILL_AFTER_BATCH"])
original = collector.NormCollector.end_batch
seen = [0]
def end_batch(self, valid):
    original(self, valid)
    seen[0] += 1
    if seen[0] > limit:
        os.kill(os.getpid(), signal.SIGKILL)
collector.NormCollector.end_batch = end_batch
from normgrowth.cli import main
sys.argv = ["normgrowth"] + sys.argv[1:]
main()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny("gpt2", root / "gpt2", seed=3, n_layers=4)
    rng = np.random.RandomState(5)
    ids = rng.randint(1, VOCAB, size=(10, 12))
    data = root / "ids.npy"
    np.save(data, ids)
    return model, data


def _killed_cli(args: list[str], cwd: Path, kill_after_batch: int):
    """The CLI in a child process that SIGKILLs itself once batch ``kill_after_batch + 1`` is folded in."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_AFTER_BATCH": str(kill_after_batch)}
    return subprocess.run([sys.executable, "-c", KILLER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_sigkill_midway_then_rerun_gives_the_uninterrupted_json(setup, tmp_path, monkeypatch, capsys):
    """The uninterrupted run and the rerun after the kill run in this process; the killed one in a child."""
    model, data = setup
    monkeypatch.chdir(tmp_path)
    common = ["report", str(model), "--data", str(data), "--batch-size", "2", "--checkpoint-every", "1"]
    code, _, err = run_main(monkeypatch, capsys, *common, "--out", "a", "--json", "a.json")
    assert code == 0, err
    killed = _killed_cli(common + ["--out", "b", "--json", "b.json"], tmp_path, kill_after_batch=2)
    assert killed.returncode == -9, killed.stderr
    checkpoints = list((tmp_path / "b").glob("*.ckpt.npz"))
    assert len(checkpoints) == 1 and not list((tmp_path / "b").glob("*.json"))
    code, _, err = run_main(monkeypatch, capsys, *common, "--out", "b", "--json", "b.json")
    assert code == 0, err
    # two batches of two sequences were checkpointed before the kill in the third
    assert [line for line in err.splitlines() if "resuming" in line] == ["resuming at sequence 4 of 10"]
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    (a_npz,), (b_npz,) = (tmp_path / "a").glob("*.npz"), (tmp_path / "b").glob("*.npz")
    with np.load(a_npz) as a, np.load(b_npz) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert not checkpoints[0].exists()  # a finished run removes its checkpoint


def _collect_with(model_dir, data, ckpt, batch_size=2, stop_after=None):
    """``collect`` with a checkpoint; ``stop_after``: raise from the progress callback after that many
    batches (an interruption after the checkpoint of that batch was written)."""
    from normgrowth.collector import collect
    from normgrowth.models import load_model

    model = load_model(str(model_dir), device="cpu")
    seen = []

    def progress(done, total):
        seen.append(done)
        if stop_after is not None and len(seen) >= stop_after:
            raise KeyboardInterrupt

    return collect(model, str(data), batch_size=batch_size, checkpoint=ckpt, progress=progress)


def test_a_checkpoint_of_other_settings_or_an_unreadable_one_is_not_used(setup, tmp_path):
    from normgrowth.resume import Checkpoint

    model, data = setup
    notes: list[str] = []
    ckpt = Checkpoint(tmp_path / "entry", "key-1", every=1, note=notes.append)
    with pytest.raises(KeyboardInterrupt):
        _collect_with(model, data, ckpt, stop_after=2)
    assert ckpt.path().is_file()
    reference = _collect_with(model, data, None, batch_size=5)
    # other batch size: not resumed (numbers of a batch depend on its padding and merge order)
    other = _collect_with(model, data, ckpt, batch_size=5)
    assert any("ignoring checkpoint" in n and "batch_size" in n for n in notes)
    assert not any("resuming" in n for n in notes)
    np.testing.assert_array_equal(other.sites["resid_post"].mean, reference.sites["resid_post"].mean)
    # other cache key: not resumed
    notes.clear()
    with pytest.raises(KeyboardInterrupt):
        _collect_with(model, data, ckpt, stop_after=2)
    foreign = Checkpoint(tmp_path / "entry", "key-2", every=1, note=notes.append)
    _collect_with(model, data, foreign)
    assert any("ignoring checkpoint" in n and "key" in n for n in notes)
    # a torn file: not resumed, recomputed
    notes.clear()
    foreign.path().write_bytes(b"PK\x03\x04 not a zip")
    res = _collect_with(model, data, foreign)
    assert any("unreadable" in n for n in notes) and not foreign.path().exists()
    np.testing.assert_array_equal(res.sites["resid_post"].seq_mean, _collect_with(model, data, None).sites["resid_post"].seq_mean)


def test_in_process_interruption_resumes_bit_for_bit(setup, tmp_path):
    from normgrowth.resume import Checkpoint

    model, data = setup
    notes: list[str] = []
    ckpt = Checkpoint(tmp_path / "entry", "k", every=2, note=notes.append)
    with pytest.raises(KeyboardInterrupt):
        _collect_with(model, data, ckpt, stop_after=3)  # checkpoint at batch 2 (4 sequences), stopped in batch 3
    resumed = _collect_with(model, data, ckpt)
    assert notes == ["resuming at sequence 4 of 10"]
    whole = _collect_with(model, data, None)
    assert resumed.to_json() == whole.to_json()
    for name, value in whole.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[name], value, err_msg=name)


def test_progress_rate_and_time_left_count_only_work_since_the_first_update():
    from normgrowth.cli import progress_text

    # resumed at 400 of 1000 sequences with 40,000 tokens done; 10 s later 500 sequences, 50,000 tokens
    assert progress_text(500, 1000, 50_000, (100.0, 400, 40_000), 110.0) == "1,000 tok/s, 0:50 left"
    assert progress_text(400, 1000, 40_000, (100.0, 400, 40_000), 110.0) == ""  # nothing done yet: no estimate
    assert progress_text(100, 1000, None, (0.0, 0, 0), 3.0) == "0:27 left"  # 900 sequences at 0.03 s each
    assert progress_text(1, 100_000, 10, (0.0, 0, 0), 1.0) == "10 tok/s, 27:46:39 left"


def test_deletion_interrupted_in_either_pass_resumes_to_the_same_document(setup, tmp_path):
    from normgrowth.resume import Checkpoint
    from normgrowth.data import load_tokens
    from normgrowth.deletion import collect_deletion
    from normgrowth.models import load_model

    model_dir, data = setup
    model = load_model(str(model_dir), device="cpu")
    batch = load_tokens(str(data), model)
    whole = collect_deletion(model, batch, batch_size=3, n_boot=50).to_json()
    notes: list[str] = []
    ckpt = Checkpoint(tmp_path / "deletion-entry", "k", every=2, note=notes.append)

    def stop_after(k):
        seen = []

        def progress(done, total):
            seen.append(done)
            if len(seen) >= k:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):  # after the second pass's first batch: only the means are saved
        collect_deletion(model, batch, batch_size=3, n_boot=50, checkpoint=ckpt, progress=stop_after(1))
    with pytest.raises(KeyboardInterrupt):  # resumed after the first pass; saved and stopped after batch 2
        collect_deletion(model, batch, batch_size=3, n_boot=50, checkpoint=ckpt, progress=stop_after(2))
    resumed = collect_deletion(model, batch, batch_size=3, n_boot=50, checkpoint=ckpt).to_json()
    assert notes == ["resuming after the first pass (write means)", "resuming at sequence 6 of 10"]
    assert resumed == whole
    assert not ckpt.path().exists()
