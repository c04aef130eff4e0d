"""The benchmark script: its quick path runs end to end and summarises its own raw timings, and the
target checker can fail.

``test_quick_bench_smallest_config`` (seconds) runs in ``make test``; the full quick sweep (both tiny
models, every configuration, each in its own subprocess as in a real run) is marked ``slow``
(minutes; ``pytest -m slow``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def _run_bench(out: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--reps", "1", "--out", str(out),
                           "--cache-dir", str(out / "models"), *args],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(out.glob("quick-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), proc.stdout


def _check_group(group: dict, names: tuple[str, ...]) -> None:
    """Every configuration ran; medians, throughputs and ratios agree with the raw per-pass timings."""
    assert set(group["configs"]) == set(names)
    for name in names:
        res = group["configs"][name]
        assert res["wall_all"] and res["peak_bytes"] is not None, (name, res)
        assert res["wall_s"] == pytest.approx(np.median(res["wall_all"]))
        n_tokens = group["seq_len"] * group["batch_size"]
        assert res["tokens_per_s"] == pytest.approx(n_tokens / np.median(res["wall_all"]))
    a = group["configs"]["a"]
    for name in names:
        res = group["configs"][name]
        assert res["time_ratio_to_a"] == pytest.approx(np.median(res["wall_all"]) / np.median(a["wall_all"]))


def test_quick_bench_smallest_config(tmp_path):
    names = ("a", "c", "d", "f")
    report, stdout = _run_bench(tmp_path, "--models", "tiny-gpt2", "--configs", ",".join(names))
    assert report["settings"]["quick"] is True and report["machine"]["device"] == "cpu"
    (group,) = report["groups"]
    assert group["model"] == "tiny-gpt2"
    _check_group(group, names)
    assert report["scaling"] and report["scaling"][0]["increase"] is not None
    assert "targets:" in stdout and "normgrowth.collect" in stdout


@pytest.mark.slow
def test_quick_bench_every_config_in_subprocesses(tmp_path):
    sys.path.insert(0, str(BENCH.parent))
    import bench

    report, stdout = _run_bench(tmp_path, "--isolation", "subprocess")
    assert report["settings"]["isolation"] == "subprocess"
    assert {g["model"] for g in report["groups"]} == {"tiny-gpt2", "tiny-neox"}
    for group in report["groups"]:
        ran = tuple(n for n, res in group["configs"].items() if "skipped" not in res)
        assert set(ran) >= {"a", "b", "c", "d", "e"}
        _check_group({**group, "configs": {n: group["configs"][n] for n in ran}}, ran)
        assert set(group["configs"]) == set(bench.DEFAULT_CONFIGS)
    assert all(t["met"] is not None for t in report["targets"])


def test_target_checker_reports_missed_targets():
    """Planted ratios on either side of every limit: the checker says met / MISSED accordingly."""
    sys.path.insert(0, str(BENCH.parent))
    import bench

    def group(c_time, c_mem, d_over_c, f_time):
        a = {"wall_s": 1.0, "peak_bytes": 100.0, "time_ratio_to_a": 1.0, "memory_ratio_to_a": 1.0}
        c = {"wall_s": c_time, "peak_bytes": 100.0 * c_mem, "time_ratio_to_a": c_time, "memory_ratio_to_a": c_mem}
        d = {"wall_s": c_time * d_over_c, "peak_bytes": 100.0 * c_mem * d_over_c * 3}
        f = {"wall_s": f_time, "time_ratio_to_a": f_time}
        return {"model": "m", "seq_len": 1024, "batch_size": 8, "configs": {"a": a, "c": c, "d": d, "f": f}}

    good = bench.check_targets([group(1.1, 1.1, 2.1, 2.9)], [{"model": "m", "seq_len": 128, "batch_size": 8,
                                                               "n_seqs": 16, "increase": 0.04}], 1024)
    bad = bench.check_targets([group(1.2, 1.3, 1.9, 3.1)], [{"model": "m", "seq_len": 128, "batch_size": 8,
                                                             "n_seqs": 16, "increase": 0.06}], 1024)
    assert len(good) == len(bad) == 6
    assert all(t["met"] for t in good)
    assert not any(t["met"] for t in bad[:3] + bad[4:])  # d/c memory = 3 * d/c time: 5.7 >= 5 in both
    assert bad[3]["met"] is True
