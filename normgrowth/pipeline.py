"""Running the analyses: settings, the results cache and one function per command, for the CLI and notebooks.

    from normgrowth.pipeline import run_report
    run = run_report("path/to/checkpoint", data="builtin", out="results")
    fit_site(run.results, "resid_post"), run.results.to_frame(), run.document()   # fit_site: normgrowth.fit

Every ``run_*`` function takes the settings of :class:`RunSettings` as keywords, loads the model only when it
has to, reuses a result from ``out`` that was computed for the same model, data and number-changing settings by
the same code (keys: :mod:`normgrowth.cache`), saves what it computes there, and returns a run object
(:mod:`normgrowth.runs`). Nothing is printed: what happens is reported to the optional ``progress`` callback
as :class:`Event` values (notes such as "reusing cached result ...", and the start, advance and end of each
streaming pass).

Cache entries under ``out`` (``<kind>-<model slug>-<key[:12]>``):

* ``report``: the collected :class:`~normgrowth.results.Results` (``.json`` + ``.npz``); key settings
  ``n_seqs``, ``seq_len``, ``dtype``, ``sites``;
* ``weights``: a :class:`~normgrowth.weights.WeightsResult` (``.json`` + ``.npz``); key settings as for
  ``report`` plus whether real data was compared, the random-input settings and the fit window;
* ``deletion``: the deletion JSON (``DeletionResults.to_json()``); key settings ``n_seqs``, ``seq_len``,
  ``dtype``, ``ablate``.

An entry that cannot be read (torn write, other layout) is recomputed, never trusted; so is an entry computed by
other code (each entry records the code hash of its kind, :mod:`normgrowth.codehash`), with one note saying
why. While a collection or
deletion pass runs, its checkpoint (``<entry>.ckpt.npz``, every ``checkpoint_every`` batches) lets a rerun of
a killed run resume (:mod:`normgrowth.resume`). Under ``torchrun`` rank 0 decides every cache hit and
alone writes entries (:mod:`normgrowth.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from .errors import NormgrowthError
from .runs import (CompareRun, DeletionDocument, DeletionRun, HorizonRun, ReportRun, RunProtocol,  # noqa: F401
                   SweepRun, WeightsRun, fits_of)

if TYPE_CHECKING:
    from .results import Results

EVENT_KINDS = ("note", "start", "advance", "end")
RANDOM_SEQS = 8  # random-input sequences of the weights analysis (normgrowth.weights.random_input_gains)
RANDOM_LEN = 64  # positions per random-input sequence


@dataclass(frozen=True)
class Event:
    """What a run reports: ``note`` (one line of ``text``), or a streaming pass labelled ``text``:
    ``start``, ``advance`` (``done`` of ``total`` sequences; ``tokens``: real tokens in those sequences,
    when known), ``end``."""

    kind: str
    text: str = ""
    done: int = 0
    total: Optional[int] = None
    tokens: Optional[int] = None


ProgressCallback = Callable[[Event], None]


# ----------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------
def _positive_or_none(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NormgrowthError(f"{name} must be a positive integer or None, got {value!r}.")
    return value


def _batch_size_setting(value: Any) -> Optional[int]:
    """A batch size as given (int, its string, or 'auto'/None) -> int, or None for auto."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    from .batching import resolve_batch_size  # raises the one-line --batch-size error

    return resolve_batch_size(value, None, 1)


@dataclass(frozen=True)
class RunSettings:
    """Settings shared by every command that runs a model over data.

    ``batch_size`` None means 'auto' (sized from free memory); ``out`` None means no cache. Only ``n_seqs``,
    ``seq_len``, ``dtype``, ``revision`` and ``data`` (with the model) key the cache: batch size, device and
    device map do not change the numbers.
    """

    data: Optional[str] = "builtin"
    n_seqs: Optional[int] = None
    seq_len: Optional[int] = None
    batch_size: Optional[int] = 8
    device: Optional[str] = None
    dtype: str = "float32"
    revision: Optional[str] = None
    device_map: Optional[str] = None
    out: Optional[str] = None
    checkpoint_every: Optional[int] = None

    def __post_init__(self) -> None:
        _positive_or_none("n_seqs", self.n_seqs)
        _positive_or_none("checkpoint_every", self.checkpoint_every)
        _positive_or_none("seq_len", self.seq_len)
        object.__setattr__(self, "batch_size", _batch_size_setting(self.batch_size))
        if not isinstance(self.dtype, str) or not self.dtype:
            raise NormgrowthError(f"dtype must be a name such as 'float32' or 'bfloat16', got {self.dtype!r}.")
        for name in ("data", "device", "revision", "device_map", "out"):
            value = getattr(self, name)
            if isinstance(value, Path):
                object.__setattr__(self, name, str(value))
            elif value is not None and not isinstance(value, str):
                raise NormgrowthError(f"{name} must be a string or None, got {value!r}.")

    def cache_settings(self) -> dict[str, Any]:
        """The settings part of a cache key shared by every kind."""
        return {"n_seqs": self.n_seqs, "seq_len": self.seq_len, "dtype": self.dtype}

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every ``run_*`` function (``run_report(m, **s.as_kwargs())``)."""
        return dataclasses.asdict(self)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "RunSettings":
        unknown = sorted(set(doc) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise NormgrowthError(f"unknown run setting(s) {unknown}: use only "
                                  f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        return cls(**doc)


# ----------------------------------------------------------------------------------------------
# plumbing
# ----------------------------------------------------------------------------------------------
class _Emitter:
    def __init__(self, progress: Optional[ProgressCallback]):
        self.progress = progress

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress(Event("note", text))

    def stream(self, label: str, fn: Callable[[Callable[[int, int], None]], Any],
               tokens: Optional[Callable[[int], int]] = None) -> Any:
        """``fn(update)`` between ``start`` and ``end`` events; ``update(done, total)`` sends ``advance``,
        with ``tokens(done)`` real tokens when given."""
        if self.progress is None:
            return fn(None)
        progress = self.progress
        progress(Event("start", label))

        def update(done: int, total: int) -> None:
            progress(Event("advance", label, int(done), int(total), None if tokens is None else tokens(done)))

        try:
            return fn(update)
        finally:
            progress(Event("end", label))


def _token_counter(batch: Any) -> Callable[[int], int]:
    """done -> real tokens in the first ``done`` sequences of ``batch`` (rank 0's block starts at 0)."""
    cum = batch.attention_mask.sum(1).cumsum(0)

    def tokens(done: int) -> int:
        return int(cum[min(done, len(cum)) - 1]) if done > 0 else 0

    return tokens


class _ModelHandle:
    """Loads the model once, on first use."""

    def __init__(self, spec: str, settings: RunSettings, loaded: Any = None):
        self.spec, self.settings, self.loaded = spec, settings, loaded

    def get(self) -> Any:
        if self.loaded is None:
            from .distributed import check_device_map, world
            from .models import load_model

            check_device_map(self.settings.device_map)
            world()  # under torchrun: join the group first, which makes cuda:LOCAL_RANK the default GPU
            s = self.settings
            self.loaded = load_model(self.spec, device=s.device, dtype=s.dtype, revision=s.revision,
                                     device_map=s.device_map)
        return self.loaded


@dataclass(frozen=True)
class _Entry:
    """One cache entry: its base path (``.json`` / ``.npz``), its full key and the stamp it records
    (:func:`normgrowth.cache.stamp`: the key and the code hash of its kind)."""

    base: Path
    key: str
    stamp: dict[str, str]

    @property
    def json(self) -> Path:
        return self.base.with_suffix(".json")


def _entry(kind: str, spec: str, settings: RunSettings, extra: dict[str, Any]) -> Optional[_Entry]:
    """The cache entry of this run, or None without ``out``."""
    if settings.out is None:
        return None
    from .cache import cache_path, entry_key, identity, stamp

    ident = identity(kind, spec, settings.revision, settings.data, {**settings.cache_settings(), **extra})
    st = stamp(ident)
    return _Entry(cache_path(settings.out, kind, spec, entry_key(ident)), st["key"], st)


def _current(entry: Optional[_Entry], recorded: Any, emit: "_Emitter") -> bool:
    """Whether an existing entry was computed by this code (its recorded stamp is this run's); when not,
    one note says why it is recomputed."""
    from .cache import stale_reason

    why = stale_reason(recorded, entry.stamp)
    if why is not None:
        emit.note(f"recomputing {entry.json}: {why}")
    return why is None


def _checkpoint(entry: Optional[_Entry], settings: RunSettings, emit: "_Emitter") -> Any:
    """The collector checkpoint next to the cache entry (None without ``out``)."""
    if entry is None:
        if settings.checkpoint_every is not None:
            emit.note("no checkpoints: --checkpoint-every needs --out (checkpoints live next to the cached result)")
        return None
    from .resume import Checkpoint

    return Checkpoint(entry.base, entry.key, settings.checkpoint_every, note=emit.note)


def _load_cached(cls: Any, entry: Optional[_Entry], emit: _Emitter) -> Any:
    """``cls.load(entry)`` when the entry exists, reads cleanly and was computed by this code, else None
    (under torchrun rank 0 decides, so that every rank computes, or reuses, the same things)."""
    from . import distributed
    from .protocol import saved_stamp

    result = None
    if entry is not None and entry.json.is_file() and _current(entry, saved_stamp(entry.base), emit):
        try:
            result = cls.load(entry.base)
        except Exception:  # a torn or foreign entry is recomputed, never trusted
            result = None
    if distributed.launched() and distributed.agree(result is not None) != (result is not None):
        result = cls.load(entry.base) if result is None else None  # rank 0 read it: it is complete
    if result is not None:
        emit.note(f"reusing cached result {entry.json}")
    return result


def _save(result: Any, entry: Optional[_Entry], emit: "_Emitter") -> None:
    """``result.save(entry)`` with the entry's stamp (rank 0 alone under torchrun)."""
    from . import distributed

    if entry is not None and distributed.is_main():
        result.save(entry.base, stamp=entry.stamp)
        emit.note(f"saved {entry.json}")


def _batch_size(settings: RunSettings, model: Any, n_positions: int, emit: _Emitter,
                extra_bytes_per_token: int = 0) -> int:
    """The settings' batch size, or for auto (None) one sized from the free memory of the model's input device."""
    if settings.batch_size is not None:
        return settings.batch_size
    from .batching import auto_batch_size

    size = auto_batch_size(model, n_positions, extra_bytes_per_token=extra_bytes_per_token)
    emit.note(f"batch size {size} (auto: from free memory)")
    return size


def _collection(spec: str, settings: RunSettings, emit: _Emitter, handle: _ModelHandle
                ) -> tuple["Results", Optional[Path], bool]:
    """Collected norm Results: from the cache when an identical run is there, else collected (and cached)."""
    from .collector import DEFAULT_SITES
    from .results import Results

    entry = _entry("report", spec, settings, {"sites": list(DEFAULT_SITES)})
    base = None if entry is None else entry.base
    res = _load_cached(Results, entry, emit)
    if res is not None:
        return res, base, True
    from .batching import run_with_oom_guard
    from .collector import collect
    from .data import load_tokens

    model = handle.get()
    batch = load_tokens(settings.data, model, n_seqs=settings.n_seqs, seq_len=settings.seq_len)
    size = _batch_size(settings, model, batch.tokens.shape[1], emit)
    res = emit.stream("collecting norms", lambda update: run_with_oom_guard(
        lambda: collect(model, batch, batch_size=size, seq_len=settings.seq_len, progress=update,
                        checkpoint=_checkpoint(entry, settings, emit)), size), tokens=_token_counter(batch))
    _save(res, entry, emit)
    return res, base, False


def _cached_json(entry: Optional[_Entry], emit: _Emitter, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """A JSON document from the cache entry when readable and computed by this code, else ``compute()``
    (then cached with the entry's stamp and read back, so that a computed document has the same JSON-safe
    form as a cached one)."""
    from . import distributed
    from .protocol import STAMP_KEY
    from .storage import atomic_write_json, to_json_text

    def read() -> Optional[dict]:
        try:
            doc = json.loads(entry.json.read_text())
        except (OSError, ValueError):  # unreadable entries are recomputed
            return None
        return doc if isinstance(doc, dict) else None

    doc = read() if entry is not None and entry.json.is_file() else None
    if doc is not None and not _current(entry, doc.get(STAMP_KEY), emit):
        doc = None
    if distributed.launched() and distributed.agree(doc is not None) != (doc is not None):
        doc = read() if doc is None else None  # rank 0 read it: it is complete and current
    if doc is not None:
        emit.note(f"reusing cached result {entry.json}")
        doc.pop(STAMP_KEY, None)
        return doc, True
    doc = compute()
    if entry is not None:
        if distributed.is_main():
            atomic_write_json(entry.json, {**doc, STAMP_KEY: entry.stamp})
            doc = read()
            doc.pop(STAMP_KEY, None)
        else:  # what rank 0 writes and reads back
            doc = json.loads(to_json_text(doc))
    return doc, False


def _settings(data: Optional[str], n_seqs: Optional[int], seq_len: Optional[int], batch_size: Any,
              device: Optional[str], dtype: str, out: Any, revision: Optional[str],
              device_map: Optional[str], checkpoint_every: Optional[int] = None,
              model: Optional[str] = None) -> RunSettings:
    """The run's settings; for a named model (``smollm2-135m``) on the built-in data, unset ``n_seqs`` and
    ``seq_len`` take that model's defaults (:func:`normgrowth.sources.named_data_defaults`)."""
    if model is not None and data == "builtin" and (n_seqs is None or seq_len is None):
        from .sources import named_data_defaults

        default_seqs, default_len = named_data_defaults(model)
        n_seqs = default_seqs if n_seqs is None else n_seqs
        seq_len = default_len if seq_len is None else seq_len
    return RunSettings(data=data, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, device=device,
                       dtype=dtype, revision=revision, device_map=device_map,
                       out=None if out is None else str(out), checkpoint_every=checkpoint_every)


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------
def _report(spec: str, settings: RunSettings, window: Optional[str], emit: _Emitter,
            handle: Optional[_ModelHandle] = None) -> ReportRun:
    handle = handle or _ModelHandle(spec, settings)
    res, base, cached = _collection(spec, settings, emit, handle)
    return ReportRun(results=res, fits=fits_of(res, window), window=window or None, settings=settings, cache_path=base,
                     cached=cached, model=handle.loaded)


def run_report(model: str, data: Optional[str] = "builtin", *, n_seqs: Optional[int] = None,
               seq_len: Optional[int] = None, batch_size: Union[int, str, None] = 8, device: Optional[str] = None,
               dtype: str = "float32", out: Union[str, Path, None] = None, revision: Optional[str] = None,
               device_map: Optional[str] = None, window: Optional[str] = None,
               progress: Optional[ProgressCallback] = None,
               checkpoint_every: Optional[int] = None) -> ReportRun:
    """Collect (or reuse from ``out``) the norm statistics of ``model`` on ``data`` and fit every site.

    Fits: :meth:`Results.fit` per site over ``window`` ("a:b"; None: the default window).
    """
    settings = _settings(data, n_seqs, seq_len, batch_size, device, dtype, out, revision, device_map,
                         checkpoint_every, model=model)
    return _report(model, settings, window, _Emitter(progress))


def _weights(spec: str, settings: RunSettings, *, with_data: bool, window: Optional[str], random_inputs: bool,
             random_seqs: int, random_len: int, seed: int, emit: _Emitter,
             handle: Optional[_ModelHandle] = None, report: Optional[ReportRun] = None) -> WeightsRun:
    from .weights import WeightsResult, analyse_weights

    handle = handle or _ModelHandle(spec, settings)
    extra = {"with_data": with_data, "random_inputs": random_inputs, "random_seqs": random_seqs,
             "random_len": random_len, "seed": seed, "window": window or None}
    entry = _entry("weights", spec, settings, extra)
    base = None if entry is None else entry.base
    result = _load_cached(WeightsResult, entry, emit)
    if result is not None:
        return WeightsRun(result=result, settings=settings, cache_path=base, cached=True, report=report)
    results = None
    if with_data:
        report = report or _report(spec, settings, None, emit, handle)
        results = report.results
    model = handle.get()
    win = None
    if window:
        from .fit import parse_window

        win = parse_window(window, model.n_layers)
    result = analyse_weights(model, results=results, random_inputs=random_inputs, n_seqs=random_seqs,
                             seq_len=random_len, seed=seed, window=win)
    _save(result, entry, emit)
    return WeightsRun(result=result, settings=settings, cache_path=base, cached=False, report=report)


def run_weights(model: str, data: Optional[str] = None, *, n_seqs: Optional[int] = None,
                seq_len: Optional[int] = None, batch_size: Union[int, str, None] = 8, device: Optional[str] = None,
                dtype: str = "float32", out: Union[str, Path, None] = None, revision: Optional[str] = None,
                device_map: Optional[str] = None, window: Optional[str] = None, random_inputs: bool = True,
                random_seqs: int = RANDOM_SEQS, random_len: int = RANDOM_LEN, seed: int = 0,
                progress: Optional[ProgressCallback] = None,
                checkpoint_every: Optional[int] = None) -> WeightsRun:
    """Weight norms of ``model`` with their growth fits over ``window``; with ``random_inputs``, output norms on
    ``random_seqs`` x ``random_len`` random inputs, compared with the real ones when ``data`` is given (its
    collection is reused from, or saved to, ``out`` like ``run_report``'s)."""
    settings = _settings(data, n_seqs, seq_len, batch_size, device, dtype, out, revision, device_map,
                         checkpoint_every, model=model)
    for name, value in (("random_seqs", random_seqs), ("random_len", random_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NormgrowthError(f"{name} must be a positive integer, got {value!r}.")
    return _weights(model, settings, with_data=data is not None, window=window, random_inputs=random_inputs,
                    random_seqs=random_seqs, random_len=random_len, seed=seed, emit=_Emitter(progress))


def _deletion(spec: str, settings: RunSettings, ablate: Optional[str], emit: _Emitter,
              handle: Optional[_ModelHandle] = None) -> DeletionRun:
    handle = handle or _ModelHandle(spec, settings)
    ablate = None if ablate in (None, "", "none") else ablate

    def compute() -> dict:
        from .batching import run_with_oom_guard
        from .data import load_tokens
        from .deletion import collect_deletion, deletion_bytes_per_token, parse_ablate

        model = handle.get()
        batch = load_tokens(settings.data, model, n_seqs=settings.n_seqs, seq_len=settings.seq_len)
        writes = parse_ablate(ablate, model) if ablate else None
        size = _batch_size(settings, model, batch.tokens.shape[1], emit,
                           extra_bytes_per_token=deletion_bytes_per_token(model))
        res = emit.stream("deletion statistics", lambda update: run_with_oom_guard(
            lambda: collect_deletion(model, batch, batch_size=size, ablate=writes, progress=update,
                                     checkpoint=_checkpoint(entry, settings, emit)), size),
            tokens=_token_counter(batch))
        return res.to_json()

    entry = _entry("deletion", spec, settings, {"ablate": ablate})
    base = None if entry is None else entry.base
    doc, cached = _cached_json(entry, emit, compute)
    return DeletionRun(result=DeletionDocument(doc), settings=settings, cache_path=base, cached=cached)


def run_deletion(model: str, data: Optional[str] = "builtin", *, n_seqs: Optional[int] = None,
                 seq_len: Optional[int] = None, batch_size: Union[int, str, None] = 8, device: Optional[str] = None,
                 dtype: str = "float32", out: Union[str, Path, None] = None, revision: Optional[str] = None,
                 device_map: Optional[str] = None, ablate: Optional[str] = "default",
                 progress: Optional[ProgressCallback] = None,
                 checkpoint_every: Optional[int] = None) -> DeletionRun:
    """Deletion-by-magnitude statistics of ``model`` on ``data``; ``ablate``: writes to mean-ablate
    (``normgrowth.deletion.parse_ablate``), ``"none"`` or None for no ablation check."""
    settings = _settings(data, n_seqs, seq_len, batch_size, device, dtype, out, revision, device_map,
                         checkpoint_every, model=model)
    return _deletion(model, settings, ablate, _Emitter(progress))


def run_compare(model_a: str, model_b: str, data: Optional[str] = "builtin", *, n_seqs: Optional[int] = None,
                seq_len: Optional[int] = None, batch_size: Union[int, str, None] = 8, device: Optional[str] = None,
                dtype: str = "float32", out: Union[str, Path, None] = None, revision: Optional[str] = None,
                device_map: Optional[str] = None, window: Optional[str] = None, with_deletion: bool = True,
                progress: Optional[ProgressCallback] = None,
                checkpoint_every: Optional[int] = None) -> CompareRun:
    """Two models side by side (:func:`normgrowth.compare.compare_documents`): each side's report (fits over
    ``window``), weight norms (default window; :data:`RANDOM_SEQS` x :data:`RANDOM_LEN` random inputs
    compared with the side's data) and, with ``with_deletion``, deletion statistics without ablations - each
    reused from, or saved to, ``out``. ``revision`` (a hub revision) applies to both models."""
    from .compare import ComparisonResult, compare_documents

    settings = _settings(data, n_seqs, seq_len, batch_size, device, dtype, out, revision, device_map,
                         checkpoint_every)
    emit = _Emitter(progress)
    reports, weights, deletions = [], [], []
    for spec in (model_a, model_b):
        handle = _ModelHandle(spec, settings)
        rep = _report(spec, settings, window, emit, handle)
        w = _weights(spec, settings, with_data=True, window=None, random_inputs=True, random_seqs=RANDOM_SEQS,
                     random_len=RANDOM_LEN, seed=0, emit=emit, handle=handle, report=rep)
        d = _deletion(spec, settings, None, emit, handle).doc if with_deletion else None
        reports.append(rep)
        weights.append(w.result.norms.to_json())
        deletions.append(d)
    (ra, rb), (wa, wb), (da, db) = reports, weights, deletions
    doc = compare_documents(ra.results, rb.results, ra.document(), rb.document(), wa, wb, da, db)
    return CompareRun(result=ComparisonResult(doc), reports=(ra, rb), weights=(wa, wb), deletions=(da, db),
                      settings=settings)


# ----------------------------------------------------------------------------------------------
# sweeps over checkpoints
# ----------------------------------------------------------------------------------------------
def _sweep_point(point: Any, settings: RunSettings, window: Optional[str], with_weights: bool,
                 with_deletion: bool, emit: _Emitter) -> tuple[dict, bool]:
    """The document of one sweep point (:mod:`normgrowth.sweep`), from its own cache entry when present.

    Its parts come from the commands' own code paths and caches: ``fit`` is the report document's ``fit``,
    ``weight_fit`` the weights result's fits (no data, no random inputs), ``deletion`` the deletion JSON's
    ``verdict`` (no ablations)."""
    from .collector import DEFAULT_SITES
    from .storage import json_safe

    s = dataclasses.replace(settings, revision=point.revision)
    spec = point.checkpoint

    def compute() -> dict:
        handle = _ModelHandle(spec, s)
        rep = _report(spec, s, window, emit, handle)
        meta = rep.results.meta
        doc: dict[str, Any] = {
            "checkpoint": spec, "revision": point.revision, "step": point.step, "series": point.series,
            "model": meta.model, "family": meta.family, "n_layers": meta.n_layers, "d_model": meta.d_model,
            "normalization": meta.normalization, "ln_free": meta.ln_free, "n_seqs": meta.n_seqs,
            "n_tokens": meta.n_tokens,
            "fit": rep.document()["fit"], "weight_fit": None, "deletion": None}
        if with_weights:
            w = _weights(spec, s, with_data=False, window=window, random_inputs=False, random_seqs=RANDOM_SEQS,
                         random_len=RANDOM_LEN, seed=0, emit=emit, handle=handle)
            doc["weight_fit"] = w.result.norms.to_json().get("fit")
        if with_deletion:
            d = _deletion(spec, s, None, emit, handle)
            doc["deletion"] = {"verdict": d.doc.get("verdict")}
        return json_safe(doc)

    entry = _entry("sweep_point", spec, s, {"sites": list(DEFAULT_SITES), "window": window or None,
                                             "weights": with_weights, "deletion": with_deletion})
    return _cached_json(entry, emit, compute)


def run_sweep(checkpoints: Union[str, list[str]], data: Optional[str] = "builtin", *,
              revisions: Union[str, list[str], None] = None, n_seqs: Optional[int] = None,
              seq_len: Optional[int] = None, batch_size: Union[int, str, None] = 8, device: Optional[str] = None,
              dtype: str = "float32", out: Union[str, Path, None] = None, revision: Optional[str] = None,
              device_map: Optional[str] = None, window: Optional[str] = None, with_weights: bool = True,
              with_deletion: bool = True, progress: Optional[ProgressCallback] = None,
              checkpoint_every: Optional[int] = None) -> SweepRun:
    """The report's fits (plus weight-norm fits and the deletion verdict) at every checkpoint of
    :func:`normgrowth.sweep.expand_checkpoints` ``(checkpoints, revisions)``, in that order.

    With ``out`` every point is cached (kind ``sweep_point``, on top of the ``report``, ``weights`` and
    ``deletion`` entries it is made from), so an interrupted sweep resumes where it stopped. ``revision``: one
    hub revision for every checkpoint (the same as ``revisions=[revision]``)."""
    from .sweep import SweepResult, expand_checkpoints, parse_revisions

    specs = [checkpoints] if isinstance(checkpoints, (str, Path)) else [str(c) for c in checkpoints]
    revs = parse_revisions(revisions) if isinstance(revisions, str) else list(revisions or [])
    if revision is not None:
        if revs:
            raise NormgrowthError("give either revision (one for every checkpoint) or revisions, not both.")
        revs = [revision]
    points = expand_checkpoints([str(c) for c in specs], revs)
    settings = _settings(data, n_seqs, seq_len, batch_size, device, dtype, out, None, device_map,
                         checkpoint_every)
    emit = _Emitter(progress)
    docs, cached = [], []
    for k, point in enumerate(points):
        emit.note(f"sweep point {k + 1}/{len(points)}: {point.label}")
        doc, was_cached = _sweep_point(point, settings, window, with_weights, with_deletion, emit)
        docs.append(doc)
        cached.append(was_cached)
    result = SweepResult(points=docs, settings=settings.to_json(), window=window or None)
    return SweepRun(result=result, cached=cached)


# ----------------------------------------------------------------------------------------------
# the effective layer horizon
# ----------------------------------------------------------------------------------------------
def run_horizon(model: str, data: Optional[str] = "builtin", *, n_seqs: Optional[int] = None,
                seq_len: Optional[int] = None, batch_size: Union[int, str, None] = 4, device: Optional[str] = None,
                dtype: str = "float32", out: Union[str, Path, None] = None, revision: Optional[str] = None,
                device_map: Optional[str] = None, horizons: Optional[str] = None, causal: Optional[str] = "default",
                n_calib: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                checkpoint_every: Optional[int] = None) -> HorizonRun:
    """Loss(n) with live and frozen norm scales for every horizon ``n`` of ``horizons`` ("1,2,4"; None: the
    default grid) and the causal mean-ablation check of ``causal`` (``"default"``, write labels, or
    ``"none"``); :func:`normgrowth.horizon.collect_horizon`. Cached under ``out`` (kind ``horizon``)."""
    from .horizon import HorizonResult

    settings = _settings(data, n_seqs, seq_len, batch_size, device, dtype, out, revision, device_map,
                         checkpoint_every)
    emit = _Emitter(progress)
    extra = {"horizons": horizons or None, "causal": causal or None, "n_calib": n_calib}
    entry = _entry("horizon", model, settings, extra)
    base = None if entry is None else entry.base
    result = _load_cached(HorizonResult, entry, emit)
    if result is not None:
        return HorizonRun(result=result, settings=settings, cache_path=base, cached=True)
    from .batching import run_with_oom_guard
    from .data import load_tokens
    from .horizon import collect_horizon

    loaded = _ModelHandle(model, settings).get()
    batch = load_tokens(settings.data, loaded, n_seqs=settings.n_seqs, seq_len=settings.seq_len)
    size = _batch_size(settings, loaded, batch.tokens.shape[1], emit)
    result = emit.stream("horizon passes", lambda update: run_with_oom_guard(
        lambda: collect_horizon(loaded, batch, horizons=horizons, causal_writes=causal, n_calib=n_calib,
                                batch_size=size, progress=update), size))
    _save(result, entry, emit)
    return HorizonRun(result=result, settings=settings, cache_path=base, cached=False)
