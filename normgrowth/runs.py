"""The run objects the ``run_*`` functions of :mod:`normgrowth.pipeline` return, one per command.

Every run follows :class:`RunProtocol` through its ``result`` (a :class:`~normgrowth.protocol.ResultProtocol`):
``document()`` / ``to_json()`` (what ``--json`` writes), ``text()`` (what the command prints), ``to_frame()``,
``summary()``, ``save(path)`` and ``Run.load(path)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .errors import NormgrowthError
from .protocol import ResultProtocol

if TYPE_CHECKING:
    from .fit import GrowthFit
    from .pipeline import RunSettings
    from .results import Results
    from .weights import WeightsResult


def _settings() -> "RunSettings":
    """The settings of a run rebuilt from saved files (unknown: the defaults)."""
    from .pipeline import RunSettings

    return RunSettings()


class RunProtocol:
    """What every run object offers, through its ``result`` (a :class:`~normgrowth.protocol.ResultProtocol`):
    ``document()`` / ``to_json()`` (what ``--json`` writes), ``text()`` (what the command prints),
    ``to_frame()``, ``summary()``, ``save(path)`` and ``Run.load(path)`` (the run rebuilt from its saved
    result, marked ``cached``)."""

    result: Any

    def document(self) -> dict[str, Any]:
        return self.result.to_json()

    def to_json(self) -> dict[str, Any]:
        return self.document()

    def text(self) -> str:
        raise NotImplementedError

    def to_frame(self):
        """The result's long-format pandas DataFrame (:meth:`~normgrowth.protocol.ResultProtocol.to_frame`)."""
        return self.result.to_frame()

    def summary(self) -> str:
        return self.result.summary()

    def save(self, path: Union[str, Path]) -> Path:
        """Save the result (``path.json`` and, when it has arrays, ``path.npz``); returns the JSON path."""
        return self.result.save(path)

    @classmethod
    def load(cls, path: Union[str, Path]) -> Any:
        raise NotImplementedError


def fits_of(results: "Results", window: Optional[str]) -> dict[str, "GrowthFit"]:
    """The growth fit of every site present over ``window`` (none with fewer than two layers)."""
    if results.meta.n_layers < 2:
        return {}
    from .fit import fit_site

    return {site: fit_site(results, site, window) for site, st in results.sites.items() if st is not None}


@dataclass(repr=False)
class ReportRun(RunProtocol):
    """``normgrowth report``: the collection, its growth fits, and where it came from. ``document()`` is the
    report JSON; ``to_frame()``, ``save`` and ``summary()`` are the collection's."""

    results: "Results"
    fits: dict[str, "GrowthFit"]
    window: Optional[str]
    settings: RunSettings
    cache_path: Optional[Path]  # base path of the cache entry (``.json`` / ``.npz``), None without ``out``
    cached: bool  # True when the collection was read from the cache
    model: Any = None  # the LoadedModel when this run loaded one
    _document: Optional[dict] = field(default=None, repr=False)

    @property
    def result(self) -> "Results":
        return self.results

    def document(self) -> dict[str, Any]:
        """The report JSON (:func:`normgrowth.report.report_document` with these fits)."""
        if self._document is None:
            from .report import report_document

            self._document = report_document(self.results, self.window, self.fits)
        return self._document

    def text(self) -> str:
        """Per-layer table, then the growth-fit table."""
        from .fit import format_fit_table
        from .report import format_report_table

        from .sources import source_note

        text = format_report_table(self.results)
        note = source_note(self.results.meta.source)
        if note:
            text = note + "\n" + text
        if self.fits:
            text += ("\n\ngrowth fits (log-linear over the window; 95 % CI by bootstrap over sequences):\n"
                     + format_fit_table(self.fits))
        return text

    @classmethod
    def load(cls, path: Union[str, Path], window: Optional[str] = None) -> "ReportRun":
        """The run of a saved collection, its fits made over ``window``."""
        from .protocol import result_base
        from .results import Results

        results = Results.load(path)
        return cls(results=results, fits=fits_of(results, window), window=window or None, settings=_settings(),
                   cache_path=result_base(path), cached=True)


@dataclass(repr=False)
class WeightsRun(RunProtocol):
    """``normgrowth weights``: the weights result (the weights.json document) and its collection, if any."""

    result: "WeightsResult"
    settings: RunSettings
    cache_path: Optional[Path]
    cached: bool
    report: Optional[ReportRun] = None  # the collection compared with, when data was given and computed here

    def text(self) -> str:
        from .weights import format_weights

        return format_weights(self.result)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "WeightsRun":
        from .protocol import result_base
        from .weights import WeightsResult

        return cls(result=WeightsResult.load(path), settings=_settings(), cache_path=result_base(path), cached=True)


class DeletionDocument(ResultProtocol):
    """A deletion JSON (``DeletionResults.to_json()``) with the result protocol: what the deletion cache
    holds and ``run_deletion`` returns. Frame rows: :func:`normgrowth.deletion.deletion_frame_rows`, the same as
    :class:`~normgrowth.deletion.DeletionResults`."""

    kind = "deletion"

    def __init__(self, doc: dict[str, Any]):
        self.doc = doc

    def to_json(self) -> dict[str, Any]:
        return self.doc

    @classmethod
    def from_saved(cls, doc: dict[str, Any], arrays: dict[str, Any]) -> "DeletionDocument":
        if "verdict" not in doc or "writes" not in doc:
            raise NormgrowthError("saved deletion result has no verdict or writes (another layout): run "
                                  "normgrowth deletion again.")
        return cls({k: v for k, v in doc.items() if k not in ("result_kind", "arrays")})

    def frame_rows(self):
        from .deletion import deletion_frame_rows

        return deletion_frame_rows(self.doc)

    def summary(self) -> str:
        return self.text().splitlines()[0]

    def text(self) -> str:
        from .deletion import format_deletion_json

        return format_deletion_json(self.doc)


@dataclass(repr=False)
class DeletionRun(RunProtocol):
    """``normgrowth deletion``: the deletion document (:class:`DeletionDocument`) and its printable report."""

    result: DeletionDocument
    settings: RunSettings
    cache_path: Optional[Path]
    cached: bool

    @property
    def doc(self) -> dict[str, Any]:
        return self.result.doc

    def text(self) -> str:
        return self.result.text()

    @classmethod
    def load(cls, path: Union[str, Path]) -> "DeletionRun":
        from .protocol import result_base

        return cls(result=DeletionDocument.load(path), settings=_settings(), cache_path=result_base(path),
                   cached=True)


@dataclass(repr=False)
class CompareRun(RunProtocol):
    """``normgrowth compare``: the comparison of two models (:class:`~normgrowth.compare.ComparisonResult`) and
    the runs it was made from (absent when loaded)."""

    result: Any  # ComparisonResult
    reports: tuple[Optional[ReportRun], Optional[ReportRun]] = (None, None)
    weights: tuple[Optional[dict], Optional[dict]] = (None, None)  # WeightNorms JSON of each side
    deletions: tuple[Optional[dict], Optional[dict]] = (None, None)
    settings: "RunSettings" = field(default_factory=_settings)

    @property
    def doc(self) -> dict[str, Any]:
        return self.result.doc

    def text(self) -> str:
        from .compare import format_comparison

        return format_comparison(self.doc)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CompareRun":
        from .compare import ComparisonResult

        return cls(result=ComparisonResult.load(path))


@dataclass(repr=False)
class SweepRun(RunProtocol):
    """``normgrowth sweep``: the :class:`~normgrowth.sweep.SweepResult` and which points came from the cache."""

    result: Any  # SweepResult
    cached: list[bool]

    def text(self) -> str:
        return self.result.text()

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SweepRun":
        from .sweep import SweepResult

        result = SweepResult.load(path)
        return cls(result=result, cached=[True] * len(result.points))


@dataclass(repr=False)
class HorizonRun(RunProtocol):
    """``normgrowth horizon``: the :class:`~normgrowth.horizon.HorizonResult` and where it came from."""

    result: Any  # HorizonResult
    settings: RunSettings
    cache_path: Optional[Path]
    cached: bool

    def text(self) -> str:
        return self.result.text()

    @classmethod
    def load(cls, path: Union[str, Path]) -> "HorizonRun":
        from .horizon import HorizonResult
        from .protocol import result_base

        return cls(result=HorizonResult.load(path), settings=_settings(), cache_path=result_base(path), cached=True)
