"""normgrowth: measure, fit and explain residual-stream norm growth in transformers.

Public entry points (imported lazily so that ``normgrowth --help`` stays fast): ``load_model``,
``load_tokens``, ``collect`` (a function: ``normgrowth.collect(model, data)``), ``Results``,
``TokenBatch``, ``ModelConfig``, ``LoadedModel``, ``NormgrowthError``, ``fit_site`` (a site's growth fit).
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("normgrowth.models", "load_model"),
    "ModelConfig": ("normgrowth.models", "ModelConfig"),
    "LoadedModel": ("normgrowth.models", "LoadedModel"),
    "load_tokens": ("normgrowth.data", "load_tokens"),
    "TokenBatch": ("normgrowth.data", "TokenBatch"),
    "collect": ("normgrowth.collector", "collect"),
    "Results": ("normgrowth.results", "Results"),
    "fit_site": ("normgrowth.fit", "fit_site"),
    "NormgrowthError": ("normgrowth.errors", "NormgrowthError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'normgrowth' has no attribute {name!r}")
