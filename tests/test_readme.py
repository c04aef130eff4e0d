"""The README's Python API example runs as written, on the session's tiny zoo."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_example_runs(tiny_zoo, tmp_path, monkeypatch):
    from normgrowth.errors import NormgrowthError

    (block,) = _python_blocks()
    (tmp_path / "zoo").symlink_to(tiny_zoo[0], target_is_directory=True)  # the session's tiny zoo, read only
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    res, run = namespace["res"], namespace["run"]
    assert res.meta.n_seqs == 2  # the last collect: the two texts
    assert set(run.fits) >= {"resid_pre", "resid_post"}
    assert (tmp_path / "results" / "run.json").is_file() and (tmp_path / "results" / "run.npz").is_file()
    with pytest.raises(NormgrowthError, match="no saved"):
        namespace["ng"].Results.load(tmp_path / "results" / "missing")
