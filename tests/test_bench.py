"""The benchmark script: its --quick mode runs end to end, and the target checker can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--models", "tiny-gpt2", "--configs", "a,c,d,f",
                           "--reps", "1", "--out", str(out), "--cache-dir", str(out / "models")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = list(out.glob("quick-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), proc.stdout


def test_quick_bench_writes_every_configuration(quick_report):
    report, stdout = quick_report
    assert report["settings"]["quick"] is True and report["machine"]["device"] == "cpu"
    (group,) = [g for g in report["groups"] if g["seq_len"] == max(g["seq_len"] for g in report["groups"])]
    for name in ("a", "c", "d", "f"):
        res = group["configs"][name]
        assert res["wall_s"] > 0 and res["tokens_per_s"] > 0 and res["peak_bytes"] is not None, (name, res)
    a = group["configs"]["a"]
    assert a["time_ratio_to_a"] == pytest.approx(1.0)
    c = group["configs"]["c"]
    assert c["time_ratio_to_a"] == pytest.approx(c["wall_s"] / a["wall_s"])
    assert report["scaling"] and report["scaling"][0]["increase"] is not None
    assert "targets:" in stdout and "normgrowth.collect" in stdout


def test_target_checker_reports_missed_targets(quick_report):
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
