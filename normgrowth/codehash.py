"""Code hashes: which version of the package's code computed a result, one hash per result kind.

A result kind's code is the package modules it can execute: the closure of its root modules under the
package's own imports (every ``import``/``from ... import`` of a package module, at module level or inside a
function, and the packages above each imported module). Its hash is the SHA-256 over those modules, in name
order, of each module's name and its syntax tree with docstrings left out (``ast.dump``), so editing a comment,
a docstring or the layout keeps the hash and any change to code, a constant or an import changes it. The hashes
are computed once, at import, from the files on disk (:data:`CODE_HASHES`); the results cache
(:mod:`normgrowth.cache`) and the resume checkpoints (:mod:`normgrowth.resume`) carry them, so that a result
computed by other code is recomputed, never reused.

A new result kind gets its entry in :data:`KIND_ROOTS`; until it has one, its hash is that of the whole
package (:data:`WHOLE_PACKAGE`), which is sound but recomputes it after any change.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Iterable, Mapping

PACKAGE = "normgrowth"
PACKAGE_DIR = Path(__file__).resolve().parent

# result kind (cache entry kind or resume-checkpoint kind) -> the modules that compute it
KIND_ROOTS: dict[str, tuple[str, ...]] = {
    "report": ("collector",),  # the cached collection; fits are recomputed from it on every run
    "collection": ("collector",),  # the collector's resume checkpoints
    "weights": ("weights",),
    "deletion": ("deletion",),
    "sweep_point": ("pipeline", "sweep"),  # a point's document is built from report, weights and deletion
    "horizon": ("horizon",),
}
WHOLE_PACKAGE = "*"  # the kind whose code is every module of the package


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules named by the import statements of ``tree`` (the code of ``module``)."""
    found: set[str] = set()
    here = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import x`: x may be a module
    deps: set[str] = set()
    for name in found:
        while name:  # importing a.b.c runs a, a.b and a.b.c
            if name in known:
                deps.add(name)
            name = name.rpartition(".")[0]
    return deps


def _module_files(root: Path, package: str) -> dict[str, Path]:
    return {_module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def scan_modules(names: Iterable[str], root: Path = PACKAGE_DIR, package: str = PACKAGE
                 ) -> tuple[dict[str, str], dict[str, set[str]]]:
    """``(digests, imports)`` of the modules ``names`` and every package module they reach through imports:
    the SHA-256 of each one's docstring-free syntax tree, and the package modules it imports."""
    files = _module_files(root, package)
    known = set(files)
    digests: dict[str, str] = {}
    imports: dict[str, set[str]] = {}
    todo = [n for n in names if n in files]
    while todo:
        name = todo.pop()
        if name in digests:
            continue
        path = files[name]
        tree = ast.parse(path.read_bytes(), filename=str(path))
        imports[name] = _imports(tree, name, path.name == "__init__.py", known) - {name}
        digests[name] = hashlib.sha256(ast.dump(_strip_docstrings(tree)).encode()).hexdigest()
        todo.extend(imports[name] - set(digests))
    return digests, imports


def closure(roots: Iterable[str], imports: Mapping[str, set[str]]) -> set[str]:
    """The modules reachable from ``roots`` through ``imports`` (roots included)."""
    seen: set[str] = set()
    todo = [r for r in roots if r in imports]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports[name] - seen)
    return seen


def kind_hashes(root: Path = PACKAGE_DIR, package: str = PACKAGE,
                kinds: Mapping[str, tuple[str, ...]] = KIND_ROOTS) -> dict[str, str]:
    """kind -> SHA-256 over (name, digest) of every module in the closure of the kind's roots; also
    :data:`WHOLE_PACKAGE` -> the same over every module."""
    rooted = {kind: [f"{package}.{r}" for r in roots] for kind, roots in kinds.items()}
    rooted[WHOLE_PACKAGE] = sorted(_module_files(root, package))
    digests, imports = scan_modules({r for roots in rooted.values() for r in roots}, root, package)
    out = {}
    for kind, roots in rooted.items():
        h = hashlib.sha256()
        for name in sorted(closure(roots, imports)):
            h.update(f"{name}\0{digests[name]}\n".encode())
        out[kind] = h.hexdigest()
    return out


CODE_HASHES: dict[str, str] = kind_hashes()


def code_hash(kind: str) -> str:
    """The hash of the code that computes results of ``kind`` (a key of :data:`KIND_ROOTS`; any other kind:
    the whole package's)."""
    return CODE_HASHES.get(kind, CODE_HASHES[WHOLE_PACKAGE])
