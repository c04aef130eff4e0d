"""Exact merges of streaming accumulators, and data-parallel runs under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normgrowth.stats import HIST_BINS, Moments, RowTable, TokenStats


def _planted(n_seqs: int = 23, k: int = 5, p: int = 9, seed: int = 0):
    """Lognormal per-token values [K, n_seqs, p] and a right-padded mask of random lengths."""
    rng = np.random.default_rng(seed)
    values = np.exp(rng.normal(1.0, 0.7, size=(k, n_seqs, p))).astype(np.float32)
    lengths = rng.integers(1, p + 1, size=n_seqs)
    mask = np.arange(p)[None, :] < lengths[:, None]
    return values, mask


def _stats_over(values: np.ndarray, mask: np.ndarray, lo: int, hi: int, batch: int = 4) -> TokenStats:
    k, _, p = values.shape
    st = TokenStats(k, p, torch.device("cpu"), hist_series=k, log_series=k)
    st.first_sequence = lo
    for a in range(lo, hi, batch):
        b = min(hi, a + batch)
        st.update(torch.from_numpy(values[:, a:b]), torch.from_numpy(mask[a:b]))
    return st


def test_moments_merge_matches_numpy_on_concatenated_data():
    rng = np.random.default_rng(1)
    parts = [rng.normal(3.0, 2.0, size=(4, n)) for n in (7, 1, 30)]
    acc = Moments.zeros(4, torch.device("cpu"))
    for part in parts:
        one = Moments.zeros(4, torch.device("cpu"))
        one.merge_batch(torch.from_numpy(part), torch.ones(part.shape[1], dtype=torch.bool))
        acc.merge_(one)
    whole = np.concatenate(parts, axis=1)
    assert acc.count.item() == whole.shape[1]
    np.testing.assert_allclose(acc.mean.numpy(), whole.mean(1), rtol=1e-12)
    np.testing.assert_allclose(acc.variance().numpy(), whole.var(1), rtol=1e-10)


def test_moments_merge_into_empty_and_from_empty():
    part = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    full = Moments.zeros(1, torch.device("cpu"))
    full.merge_batch(part, torch.ones(3, dtype=torch.bool))
    empty = Moments.zeros(1, torch.device("cpu"))
    empty.merge_(full)
    full.merge_(Moments.zeros(1, torch.device("cpu")))
    for m in (empty, full):
        assert m.count.item() == 3
        assert m.mean.item() == pytest.approx(7 / 3)
        assert m.variance().item() == pytest.approx(np.var([1.0, 2.0, 4.0]))


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_token_stats_merge_of_blocks_equals_numpy_in_any_order(order):
    values, mask = _planted()
    k, n, p = values.shape
    bounds = [(0, 8), (8, 9), (9, n)]
    blocks = [_stats_over(values, mask, *bounds[i]) for i in order]
    merged = blocks[0]
    pending = blocks[1:]
    while pending:  # merge whichever block is adjacent to what has been merged so far
        for i, other in enumerate(pending):
            lo, hi = merged.first_sequence, merged.first_sequence + merged.n_sequences
            if other.first_sequence in (hi,) or other.first_sequence + other.n_sequences == lo:
                merged.merge_(other)
                pending.pop(i)
                break
    rest = mask.copy()
    rest[:, 0] = False
    main = values[:, rest]  # [K, tokens at positions >= 1], numpy on the concatenated data
    assert merged.count == rest.sum()
    np.testing.assert_allclose(merged.main.mean.numpy(), main.astype(np.float64).mean(1), rtol=1e-12)
    np.testing.assert_allclose(merged.main.variance().numpy(), main.astype(np.float64).var(1), rtol=1e-9)
    bos = values[:, mask[:, 0], 0].astype(np.float64)
    np.testing.assert_allclose(merged.bos.mean.numpy(), bos.mean(1), rtol=1e-12)
    np.testing.assert_allclose(merged.log_mean(), np.log(main.astype(np.float64)).mean(1), rtol=1e-12)
    np.testing.assert_allclose(merged.position_mean(),
                               (values * mask).sum(1) / np.maximum(mask.sum(0), 1), rtol=1e-6)
    seq_expect = (values * rest).astype(np.float64).sum(2) / np.maximum(rest.sum(1), 1)  # [K, n]
    assert merged.first_sequence == 0
    np.testing.assert_allclose(merged.seq_means(), seq_expect.T, rtol=1e-6)
    np.testing.assert_array_equal(merged.seq_counts(), rest.sum(1))
    hist = merged.hist_counts()
    assert hist.shape == (k, HIST_BINS)
    np.testing.assert_array_equal(hist.sum(1), np.full(k, rest.sum()))
    whole = _stats_over(values, mask, 0, n)
    np.testing.assert_array_equal(hist, whole.hist_counts())  # the same tokens in the same bins


def test_token_stats_merge_refuses_blocks_with_a_gap():
    values, mask = _planted()
    a, b = _stats_over(values, mask, 0, 4), _stats_over(values, mask, 8, 12)
    with pytest.raises(ValueError, match="not adjacent"):
        a.merge_(b)


def test_state_dict_round_trip_continues_bit_for_bit():
    values, mask = _planted(n_seqs=20)
    whole = _stats_over(values, mask, 0, 20)
    first = _stats_over(values, mask, 0, 8)
    k, _, p = values.shape
    resumed = TokenStats(k, p, torch.device("cpu"), hist_series=k, log_series=k)
    resumed.load_state_dict({key: np.array(v) for key, v in first.state_dict().items()})
    for a in range(8, 20, 4):
        resumed.update(torch.from_numpy(values[:, a:a + 4]), torch.from_numpy(mask[a:a + 4]))
    for key, value in whole.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[key], value, err_msg=key)


def test_load_state_dict_refuses_other_shapes():
    values, mask = _planted(k=5)
    st = _stats_over(values, mask, 0, 8)
    other = TokenStats(4, values.shape[2], torch.device("cpu"), hist_series=4, log_series=4)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(st.state_dict())


def test_row_table_round_trip_and_merge():
    a, b = RowTable((2,), np.float32), RowTable((2,), np.float32)
    a.append(np.ones((3, 2), np.float32))
    b.load_state_dict({"rows": np.arange(4, dtype=np.float32).reshape(2, 2)})
    a.merge_(b)
    np.testing.assert_array_equal(a.values(), np.vstack([np.ones((3, 2)), np.arange(4).reshape(2, 2)]))


# ----------------------------------------------------------------------------------------------
# sharding and torchrun
# ----------------------------------------------------------------------------------------------
def test_shard_batches_cover_every_sequence_once_at_batch_boundaries():
    from normgrowth.distributed import shard_batches

    for n, bs, world in [(10, 3, 2), (7, 2, 3), (5, 8, 2), (64, 8, 8), (1, 1, 4)]:
        blocks = [shard_batches(n, bs, r, world) for r in range(world)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        for (lo, hi), (lo2, _) in zip(blocks, blocks[1:]):
            assert hi == lo2 and lo <= hi
        starts = [lo for lo, hi in blocks if hi > lo]
        assert all(s % bs == 0 for s in starts)  # the single-process batches, unchanged
        sizes = [-(-(hi - lo) // bs) for lo, hi in blocks]
        assert max(sizes) - min(sizes) <= 1


def _floats(doc, path=""):
    """(path, value) of every number in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _floats(v, f"{path}/{k}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _floats(v, f"{path}[{i}]")
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        yield path, float(doc)


# One torchrun launch (2 CPU processes, gloo) runs the three commands the tests below check, one after the
# other in the same process group: the process start-up (torch, transformers) is paid once. Each command's
# stdout and stderr go to files per rank: "<tag>.rank<r>.out|err" in the launch folder.
TORCHRUN_DRIVER = """
import contextlib, json, os, sys
from normgrowth import cli, collector
from normgrowth.errors import NonFiniteNormError

rank = os.environ["RANK"]
commands = json.loads(sys.argv[1])


@contextlib.contextmanager
def captured(tag):
    with open(f"{tag}.rank{rank}.out", "w") as out, open(f"{tag}.rank{rank}.err", "w") as err, \\
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield


for tag in ("report", "deletion"):
    with captured(tag):
        cli.app(commands[tag], standalone_mode=False)

# Rank 1's collector meets an overflow in its first batch; rank 0 runs on and would wait for rank 1 in the merge.
original = collector.NormCollector.end_batch
def end_batch(self, valid):
    if rank == "1":
        raise NonFiniteNormError("resid_post", 1, 3, "float32")
    original(self, valid)
collector.NormCollector.end_batch = end_batch
with captured("failure"):
    sys.argv = ["normgrowth", *commands["failure"]]
    cli.main()  # exits with the command's exit code
"""


def _report_args(model, data) -> list[str]:
    return ["report", str(model), "--data", str(data), "--batch-size", "2"]


def _deletion_args(model, data) -> list[str]:
    return ["deletion", str(model), "--data", str(data), "--batch-size", "2", "--ablate", "1"]


@pytest.fixture(scope="module")
def torchrun_launch(tmp_path_factory):
    """``(folder, models and data, launch)``: report (tiny GPT-2, 4 layers, 11 x 12 tokens) and deletion (tiny
    Llama, 3 layers, 11 x 12 tokens) under torchrun writing ``two-<command>.json``, then the report again with
    rank 1 failing (``--out out``)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import VOCAB, build_tiny

    root = tmp_path_factory.mktemp("torchrun")
    inputs = {"gpt2": build_tiny("gpt2", root / "gpt2", seed=4, n_layers=4),
              "llama": build_tiny("llama", root / "llama", seed=5, n_layers=3),
              "gpt2_ids": root / "gpt2_ids.npy", "llama_ids": root / "llama_ids.npy"}
    np.save(inputs["gpt2_ids"], np.random.RandomState(6).randint(1, VOCAB, size=(11, 12)))
    np.save(inputs["llama_ids"], np.random.RandomState(7).randint(1, VOCAB, size=(11, 12)))
    commands = {
        "report": _report_args(inputs["gpt2"], inputs["gpt2_ids"]) + ["--out", "two-report", "--json",
                                                                      "two-report.json"],
        "deletion": _deletion_args(inputs["llama"], inputs["llama_ids"]) + ["--out", "two-deletion", "--json",
                                                                            "two-deletion.json"],
        "failure": _report_args(inputs["gpt2"], inputs["gpt2_ids"]) + ["--out", "out"],
    }
    (root / "driver.py").write_text(TORCHRUN_DRIVER)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "driver.py", json.dumps(commands)], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    return root, inputs, launch


def _launch_output(root, tag: str, stream: str) -> list[str]:
    """What ranks 0 and 1 printed on ``stream`` ("out" or "err") during the command ``tag``."""
    return [(root / f"{tag}.rank{r}.{stream}").read_text() for r in (0, 1)]


def _one_and_two_processes(torchrun_launch, tag: str, args: list, tmp_path, monkeypatch, capsys) -> tuple:
    """The command ``args`` run here in one process (``--out one --json one.json`` in ``tmp_path``, one torch
    thread as in each torchrun worker) and its run in the torchrun launch: ``(one JSON, two JSON, one stdout,
    two stdouts per rank, launch folder)``."""
    import json

    from conftest import run_main

    root = torchrun_launch[0]
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = run_main(monkeypatch, capsys, *args, "--out", "one", "--json", "one.json")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    errs = _launch_output(root, tag, "err")
    assert (root / f"two-{tag}.json").is_file(), (errs, torchrun_launch[2].stderr[-3000:])
    assert errs[0].count(f"wrote two-{tag}.json") == 1 and "wrote" not in errs[1]  # rank 0 alone writes
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((root / f"two-{tag}.json").read_text())
    return one, two, out, _launch_output(root, tag, "out"), root


def test_torchrun_two_cpu_processes_give_the_single_process_numbers(torchrun_launch, tmp_path, monkeypatch, capsys):
    inputs = torchrun_launch[1]
    a, b, single_out, two_out, root = _one_and_two_processes(
        torchrun_launch, "report", _report_args(inputs["gpt2"], inputs["gpt2_ids"]), tmp_path, monkeypatch, capsys)
    # rank 0 alone prints the tables
    assert two_out[0].count("growth") == single_out.count("growth") > 0 and "growth" not in two_out[1]
    fa, fb = list(_floats(a)), list(_floats(b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    n_ci = 0
    for (path, x), (_, y) in zip(fa, fb):
        if "ci95" in path and "fit_variants" not in path:  # bootstrap CIs over per-sequence means: identical
            assert x == y, path
            n_ci += 1
        else:
            # everything else, including the regression-SE CIs of fit_variants (single curves from the
            # merged streaming sums, equal to float rounding), within 1e-6 relative
            assert abs(x - y) <= 1e-6 * max(abs(x), abs(y), 1e-12), path
    assert n_ci > 20
    (one_npz,), (two_npz,) = (tmp_path / "one").glob("*.npz"), (root / "two-report").glob("*.npz")
    with np.load(one_npz) as x, np.load(two_npz) as y:
        for name in x.files:
            if "seq" in name or "hist" in name or "count" in name:  # per-sequence rows in order, counts
                np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_device_map_under_torchrun_needs_one_process_per_node(monkeypatch):
    from normgrowth.distributed import check_device_map
    from normgrowth.errors import NormgrowthError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    check_device_map("auto")  # one process per node: allowed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_device_map(None)
    with pytest.raises(NormgrowthError, match="--nproc-per-node 1"):
        check_device_map("auto")


@pytest.mark.slow
def test_bench_torchrun_row_reports_every_rank(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--configs", "c", "--ddp", "2", "--reps", "1",
                           "--scaling-n-seqs", "0", "--models", "tiny-gpt2", "--out", str(tmp_path),
                           "--cache-dir", str(tmp_path / "models")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("quick-*.json")
    (row,) = json.loads(path.read_text())["data_parallel"]
    assert row["nproc"] == 2 and sorted(r["rank"] for r in row["ranks"]) == [0, 1]
    assert row["wall_s"] == max(r["wall_s"] for r in row["ranks"])
    assert all(p is None or p > 0 for p in row["peak_bytes_per_process"])
    assert row["single"]["wall_s"] > 0 and "torchrun --nproc-per-node 2" in proc.stdout


def test_a_failure_on_one_rank_stops_every_rank_with_one_line(torchrun_launch):
    root, _, launch = torchrun_launch
    assert launch.returncode != 0
    printed = _launch_output(root, "failure", "err") + [launch.stderr]
    errors = [line for text in printed for line in text.splitlines() if line.startswith("error: ")]
    assert errors == ["error: rank 1: non-finite norm (inf or NaN) at site resid_post, layer 1, in 3 token(s) with "
                      "dtype float32: the model overflowed; rerun with --dtype float32 or bfloat16."]
    assert errors[0] in printed[0]  # printed by rank 0
    assert not list((root / "out").glob("*.json"))  # nothing written


def test_torchrun_deletion_two_cpu_processes_equal_one_and_split_the_work(torchrun_launch, tmp_path, monkeypatch,
                                                                          capsys):
    """``torchrun ... deletion``: each rank collects half the batches; the merged sums give the one-process numbers
    within 1e-9 relative (the write means are summed in another order: the only difference is rounding)."""
    inputs = torchrun_launch[1]
    a, b, _, _, _ = _one_and_two_processes(torchrun_launch, "deletion",
                                           _deletion_args(inputs["llama"], inputs["llama_ids"]), tmp_path,
                                           monkeypatch, capsys)
    assert a["shards"] == [[0, 11]]
    assert b["shards"] == [[0, 6], [6, 11]]  # 6 batches of 2: three per rank
    a.pop("shards"), b.pop("shards")
    fa, fb = list(_floats(a)), list(_floats(b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    assert len(fa) > 500
    for (path, x), (_, y) in zip(fa, fb):
        assert abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-12), (path, x, y)
    assert a["verdict"] == b["verdict"]
