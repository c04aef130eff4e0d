"""The README's Python API example runs as written, on a toy zoo built in a temporary directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    from normgrowth.errors import NormgrowthError
    from normgrowth.zoo import ZooSettings, build_pair

    (block,) = _python_blocks()
    build_pair(tmp_path / "zoo", ZooSettings.tiny(), progress=lambda msg: None)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    res, run = namespace["res"], namespace["run"]
    assert res.meta.n_seqs == 2  # the last collect: the two texts
    assert set(run.fits) >= {"resid_pre", "resid_post"}
    assert (tmp_path / "results" / "run.json").is_file() and (tmp_path / "results" / "run.npz").is_file()
    with pytest.raises(NormgrowthError, match="no saved"):
        namespace["ng"].Results.load(tmp_path / "results" / "missing")
