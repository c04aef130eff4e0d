"""Code hashes per result kind: planted import graphs, an estimator constant changed in a copy of the package,
and the cache and resume checkpoints refusing what other code computed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import VOCAB, build_tiny
from normgrowth import codehash

REPO = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


PLANTED = {
    "__init__.py": "",
    "a.py": "def f():\n    from .b import g  # a lazy import counts\n    return g()\n",
    "b.py": "from .sub.x import h\nK = 1\ndef g():\n    return h() * K\n",
    "sub/__init__.py": "",
    "sub/x.py": "from .. import c as _unused_name\ndef h():\n    return 2\n",
    "c.py": "C = 3\n",
    "d.py": "import pkg.b\nD = 4\n",
    "lonely.py": "L = 5\n",
}


def test_closure_follows_relative_absolute_lazy_and_package_imports(tmp_path):
    root = tmp_path / "pkg"
    _write(root, PLANTED)
    digests, imports = codehash.scan_modules(["pkg.a", "pkg.d"], root, "pkg")
    assert codehash.closure(["pkg.a"], imports) == {"pkg.a", "pkg.b", "pkg.sub", "pkg.sub.x", "pkg.c", "pkg"}
    assert codehash.closure(["pkg.d"], imports) == {"pkg.d", "pkg.b", "pkg.sub", "pkg.sub.x", "pkg.c", "pkg"}
    assert "pkg.lonely" not in digests  # never reached, never read


def test_a_kind_hash_changes_with_its_modules_only(tmp_path):
    root = tmp_path / "pkg"
    _write(root, PLANTED)
    kinds = {"via_a": ("a",), "only_c": ("c",)}
    before = codehash.kind_hashes(root, "pkg", kinds)
    (root / "b.py").write_text(PLANTED["b.py"].replace("K = 1", "K = 2"))
    changed = codehash.kind_hashes(root, "pkg", kinds)
    assert changed["via_a"] != before["via_a"] and changed["only_c"] == before["only_c"]
    # comments, docstrings and layout are not code
    (root / "b.py").write_text('"""doc."""\n' + PLANTED["b.py"].replace("K = 1", "K = 2  # two") + "\n\n")
    assert codehash.kind_hashes(root, "pkg", kinds) == changed
    (root / "c.py").write_text("C = 4\n")
    last = codehash.kind_hashes(root, "pkg", kinds)
    assert last["via_a"] != changed["via_a"] and last["only_c"] != changed["only_c"]


def test_an_estimator_constant_changed_in_a_copy_of_the_package(tmp_path):
    copy = tmp_path / "normgrowth"
    shutil.copytree(REPO / "normgrowth", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert codehash.kind_hashes(copy) == codehash.CODE_HASHES  # the copy is the same code
    weights = copy / "random_gains.py"  # the random-input pass of the weights analysis
    text = weights.read_text()
    assert '("ln1_in", "attn", 0)' in text
    weights.write_text(text.replace('("ln1_in", "attn", 0)', '("ln1_in", "attn", 1)'))
    after = codehash.kind_hashes(copy)
    differ = {k for k in after if after[k] != codehash.CODE_HASHES[k]}
    assert differ == {"weights", "sweep_point", "*"}  # the collection and deletion do not run weights.py


def test_a_kind_without_roots_is_keyed_by_the_whole_package(tmp_path):
    root = tmp_path / "pkg"
    _write(root, PLANTED)
    before = codehash.kind_hashes(root, "pkg", {"via_a": ("a",)})
    (root / "lonely.py").write_text("L = 6\n")  # reached by no kind's roots
    after = codehash.kind_hashes(root, "pkg", {"via_a": ("a",)})
    assert after["via_a"] == before["via_a"] and after["*"] != before["*"]
    assert codehash.code_hash("no_such_kind") == codehash.CODE_HASHES["*"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("codehash")
    model = build_tiny("gpt2", root / "gpt2", seed=3, n_layers=2)
    data = root / "ids.npy"
    np.save(data, np.random.RandomState(5).randint(1, VOCAB, size=(4, 8)))
    return str(model), str(data)


def test_a_cached_result_from_other_code_is_recomputed_with_one_note(small, tmp_path, monkeypatch):
    from normgrowth.pipeline import run_deletion, run_report

    model, data = small
    out = tmp_path / "cache"
    first = run_report(model, data, batch_size=4, out=out)
    assert not first.cached
    d1 = run_deletion(model, data, batch_size=4, out=out, ablate=None)
    monkeypatch.setitem(codehash.CODE_HASHES, "report", "0" * 64)  # as if the collector had been edited
    notes: list[str] = []
    redo = run_report(model, data, batch_size=4, out=out, progress=lambda e: notes.append(e.text)
                      if e.kind == "note" else None)
    assert not redo.cached and redo.cache_path == first.cache_path
    assert notes[0] == (f"recomputing {first.cache_path}.json: it was computed by other code (code hash "
                        f"{codehash.kind_hashes()['report'][:12]}, this code {'0' * 12})")
    assert sum("recomputing" in n for n in notes) == 1
    np.testing.assert_array_equal(redo.results.sites["resid_post"].mean, first.results.sites["resid_post"].mean)
    assert run_report(model, data, batch_size=4, out=out).cached  # rewritten by this code: reused
    assert run_deletion(model, data, batch_size=4, out=out, ablate=None).cached  # another kind's code: unchanged
    monkeypatch.setitem(codehash.CODE_HASHES, "deletion", "1" * 64)
    d2 = run_deletion(model, data, batch_size=4, out=out, ablate=None)
    assert not d2.cached and d2.doc == d1.doc and "cache" not in d2.doc


def test_a_resume_checkpoint_from_other_code_is_not_used(small, tmp_path, monkeypatch):
    from normgrowth.resume import Checkpoint
    from normgrowth.collector import collect
    from normgrowth.models import load_model

    model_dir, data = small
    model = load_model(model_dir, device="cpu")
    notes: list[str] = []
    ckpt = Checkpoint(tmp_path / "entry", "k", every=1, note=notes.append)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        collect(model, data, batch_size=2, checkpoint=ckpt, progress=stop)
    assert ckpt.path().is_file()
    monkeypatch.setitem(codehash.CODE_HASHES, "collection", "2" * 64)
    collect(model, data, batch_size=2, checkpoint=ckpt)
    assert len(notes) == 1 and "written by other code" in notes[0] and "2" * 12 in notes[0]


def test_make_result_targets_depend_on_the_package_source(tmp_path):
    """A result file older than a package source file is remade; a newer one is up to date."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    newest = max(p.stat().st_mtime for p in (REPO / "normgrowth").rglob("*.py"))
    setup_inputs = max((REPO / name).stat().st_mtime for name in ("pyproject.toml", "constraints.txt"))
    stamp = tmp_path / "venv" / ".installed"  # the environment, set up (newer than what it was set up from)
    stamp.parent.mkdir()
    stamp.touch()
    os.utime(stamp, (max(newest, setup_inputs) + 1000,) * 2)
    results = tmp_path / "results"
    args = ["make", "-q", "-C", str(REPO), f"VENV={stamp.parent}", f"RESULTS={results}", "MODELS=some/model",
            "SWEEP=some/model", "COMPARE=some/model other/model"]  # no offline zoo: results depend on sources only
    for name in ("models/some__model/report.json", "models/some__model/weights.json",
                 "models/some__model/deletion.json", "sweep.json", "compare.json"):
        target = results / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("{}")
        for mtime, expected in ((newest + 100, 0), (newest - 100, 1)):
            os.utime(target, (mtime, mtime))
            assert subprocess.run(args + [str(target)], capture_output=True).returncode == expected, (name, mtime)


def test_every_package_folder_is_declared_for_a_wheel():
    """A regular (non-editable) install ships exactly the packages pyproject.toml lists: every folder of the
    package with an ``__init__.py`` must be one of them."""
    import tomllib

    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "normgrowth").rglob("__init__.py")}
    assert found == declared
