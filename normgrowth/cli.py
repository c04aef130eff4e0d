"""Command line: ``normgrowth report | weights | fit | deletion | compare | zoo build``.

Heavy libraries (torch, transformers, TransformerLens) are imported inside the commands, so
``normgrowth --help`` answers at once. A :class:`NormgrowthError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, fit and explain residual-stream norm growth in transformers.")
zoo_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The offline model pair (with / without LayerNorm).")
app.add_typer(zoo_app, name="zoo")

MODEL = typer.Argument(..., help="Hugging Face hub name or local checkpoint directory.")
DATA = typer.Option("builtin", "--data", help="builtin | file.txt | file.jsonl | tokens.npy/.pt | HF dataset name.")
N_SEQS = typer.Option(None, "--n-seqs", help="Use at most this many sequences.")
SEQ_LEN = typer.Option(None, "--seq-len", help="Truncate sequences to this many tokens.")
BATCH = typer.Option("8", "--batch-size", help="Sequences per forward pass, or 'auto' (sized from free memory).")
DEVICE_MAP = typer.Option(None, "--device-map", help="Spread a model too large for one GPU over all visible GPUs "
                                                     "('auto', through accelerate); replaces --device.")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda when available).")
DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 (norms accumulate in float32).")
OUT = typer.Option(None, "--out", help="Results directory: cached results are reused, new ones saved there.")
JSON = typer.Option(None, "--json", help="Write the JSON summary here.")
WINDOW = typer.Option(None, "--window", help="Fit window a:b (inclusive layer indices; default skips the first "
                                              "layers and the last).")


def _echo(text: str) -> None:
    typer.echo(text)


def _progress(label: str):
    """A progress callback ``(done, total)`` drawing a bar on stderr; returns (callback, close)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=True, console=_stderr_console())
    task = bar.add_task(label, total=None)
    bar.start()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return update, bar.stop


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _parse_batch_size(batch_size: str) -> Optional[int]:
    """--batch-size as a number, or None for 'auto'; a malformed value is refused before any model loads."""
    from .batching import resolve_batch_size

    return None if str(batch_size).strip().lower() == "auto" else resolve_batch_size(batch_size, None, 1)


def _batch_size_for(size: Optional[int], model, batch, extra_bytes_per_token: int = 0) -> int:
    """``size``, or for 'auto' (None) a size from the free memory of the model's input device."""
    from .batching import auto_batch_size

    if size is None:
        size = auto_batch_size(model, batch.tokens.shape[1], extra_bytes_per_token=extra_bytes_per_token)
        typer.echo(f"batch size {size} (auto: from free memory)", err=True)
    return size


def _collect_or_load(model_spec: str, data: str, n_seqs, seq_len, batch_size, device, dtype, out, revision=None,
                     device_map=None):
    """Collected norm Results, reused from ``out`` when an identical run is cached there."""
    from .cache import cache_key, cache_path
    from .collector import DEFAULT_SITES
    from .results import Results

    path = None
    if out is not None:
        settings = {"n_seqs": n_seqs, "seq_len": seq_len, "dtype": dtype, "sites": list(DEFAULT_SITES)}
        key = cache_key("report", model_spec, revision, data, settings)
        path = cache_path(out, "report", model_spec, key)
        if path.with_suffix(".json").is_file():
            try:
                res = Results.load(path)
                typer.echo(f"reusing cached result {path}.json", err=True)
                return res, None
            except Exception:  # a stale or foreign entry is recomputed, never trusted
                pass
    from .batching import run_with_oom_guard
    from .collector import collect
    from .data import load_tokens
    from .models import load_model

    parsed = _parse_batch_size(batch_size)
    model = load_model(model_spec, device=device, dtype=dtype, revision=revision, device_map=device_map)
    batch = load_tokens(data, model, n_seqs=n_seqs, seq_len=seq_len)
    size = _batch_size_for(parsed, model, batch)
    update, close = _progress("collecting norms")
    try:
        res = run_with_oom_guard(lambda: collect(model, batch, batch_size=size, seq_len=seq_len, progress=update),
                                 size)
    finally:
        close()
    if path is not None:
        res.save(path)
        typer.echo(f"saved {path}.json", err=True)
    return res, model


def _cached_json(kind: str, model_spec: str, revision, data, settings: dict, out, compute):
    """A JSON result from ``out`` when an identical run is cached there, else ``compute()`` (then cached)."""
    import json

    from .cache import cache_key, cache_path
    from .results import atomic_write_json

    path = None
    if out is not None:
        path = cache_path(out, kind, model_spec, cache_key(kind, model_spec, revision, data, settings)).with_suffix(".json")
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                typer.echo(f"reusing cached result {path}", err=True)
                return doc
            except ValueError:  # unreadable entries are recomputed
                pass
    doc = compute()
    if path is not None:
        atomic_write_json(path, doc)
        doc = json.loads(path.read_text())  # the same JSON-safe form a cache hit returns
    return doc


def _deletion_doc(model_spec, data, n_seqs, seq_len, batch_size, device, dtype, out, revision, ablate, model=None,
                  device_map=None):
    """(deletion JSON, printable report) — cached like the other results."""
    from .deletion import DeletionResults  # noqa: F401  (fail early if the module is missing)

    text: list[str] = []

    def compute():
        from .batching import run_with_oom_guard
        from .data import load_tokens
        from .deletion import collect_deletion, deletion_bytes_per_token, format_deletion_report, parse_ablate
        from .models import load_model

        parsed = _parse_batch_size(batch_size)
        loaded = model or load_model(model_spec, device=device, dtype=dtype, revision=revision, device_map=device_map)
        batch = load_tokens(data, loaded, n_seqs=n_seqs, seq_len=seq_len)
        writes = parse_ablate(ablate, loaded) if ablate else None
        size = _batch_size_for(parsed, loaded, batch, extra_bytes_per_token=deletion_bytes_per_token(loaded))
        update, close = _progress("deletion statistics")
        try:
            res = run_with_oom_guard(lambda: collect_deletion(loaded, batch, batch_size=size, ablate=writes,
                                                              progress=update), size)
        finally:
            close()
        text.append(format_deletion_report(res))
        return res.to_json()

    settings = {"n_seqs": n_seqs, "seq_len": seq_len, "dtype": dtype, "ablate": ablate}
    doc = _cached_json("deletion", model_spec, revision, data, settings, out, compute)
    return doc, (text[0] if text else None)


@app.command()
def report(model: str = MODEL, data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
           batch_size: str = BATCH, device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
           json_path: Optional[Path] = JSON, window: Optional[str] = WINDOW,
           revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag, commit)."),
           device_map: Optional[str] = DEVICE_MAP):
    """Collect residual-stream norms per layer and print the per-layer table and growth fits."""
    from .fit import format_fit_table
    from .report import report_document, site_fits
    from .results import atomic_write_json, format_report_table

    res, _ = _collect_or_load(model, data, n_seqs, seq_len, batch_size, device, dtype, out, revision, device_map)
    _echo(format_report_table(res))
    fits = site_fits(res, window)
    if fits:
        _echo("\ngrowth fits (log-linear over the window; 95 % CI by bootstrap over sequences):")
        _echo(format_fit_table(fits))
    if json_path is not None:
        atomic_write_json(json_path, report_document(res, window, fits))
        typer.echo(f"wrote {json_path}", err=True)


@app.command()
def weights(model: str = MODEL,
            data: Optional[str] = typer.Option(None, "--data", help="Also collect real statistics on this data "
                                                                    "to compare random-input gains with (see report)."),
            n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN, batch_size: str = BATCH,
            device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
            json_path: Optional[Path] = JSON, window: Optional[str] = WINDOW,
            random_inputs: bool = typer.Option(True, "--random/--no-random", help="Feed N(0,1) inputs through "
                                                                                 "every attention and MLP."),
            random_seqs: int = typer.Option(8, "--random-seqs", help="Sequences of random inputs."),
            random_len: int = typer.Option(64, "--random-len", help="Positions per random sequence."),
            revision: Optional[str] = typer.Option(None, "--revision"), device_map: Optional[str] = DEVICE_MAP):
    """Weight norms per layer (W_OV per head, W_in, W_out, biases, gains) with growth fits; random-input gains."""
    from .models import load_model
    from .results import atomic_write_json
    from .weights import run_weights

    results = None
    loaded = None
    if data is not None:
        results, loaded = _collect_or_load(model, data, n_seqs, seq_len, batch_size, device, dtype, out, revision,
                                           device_map)
    if loaded is None:
        loaded = load_model(model, device=device, dtype=dtype, revision=revision, device_map=device_map)
    win = None
    if window:
        from .fit import parse_window

        win = parse_window(window, loaded.n_layers)
    doc, text = run_weights(loaded, results=results, random_inputs=random_inputs, n_seqs=random_seqs,
                            seq_len=random_len, window=win)
    _echo(text)
    if json_path is not None:
        atomic_write_json(json_path, {**doc["weights"], "random_inputs": doc["random_inputs"],
                                      "comparison": doc["comparison"]})
        typer.echo(f"wrote {json_path}", err=True)


@app.command()
def deletion(model: str = MODEL, data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
             batch_size: str = BATCH, device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
             json_path: Optional[Path] = JSON,
             ablate: Optional[str] = typer.Option("default", "--ablate", help="Writes to mean-ablate: block numbers "
                                                  "(0,3,6), labels (embed,mlp_out.3), 'default' (~6 spread blocks), "
                                                  "'all', or 'none'."),
             revision: Optional[str] = typer.Option(None, "--revision"), device_map: Optional[str] = DEVICE_MAP):
    """Deletion by magnitude: retention, dilution, visibility, reading shares, locality, ablations."""
    from .results import atomic_write_json

    ablate = None if ablate in (None, "", "none") else ablate
    doc, text = _deletion_doc(model, data, n_seqs, seq_len, batch_size, device, dtype, out, revision, ablate,
                              device_map=device_map)
    if text is None:
        from .deletion import format_deletion_json

        text = format_deletion_json(doc)
    _echo(text)
    if json_path is not None:
        atomic_write_json(json_path, doc)
        typer.echo(f"wrote {json_path}", err=True)


@app.command()
def compare(model_a: str = typer.Argument(..., help="Model A (e.g. with LayerNorm)."),
            model_b: str = typer.Argument(..., help="Model B (e.g. its LN-free twin)."),
            data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
            batch_size: str = BATCH, device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
            json_path: Optional[Path] = JSON,
            figure: Optional[Path] = typer.Option(None, "--figure", help="Write the comparison figure here (.png + .pdf)."),
            with_deletion: bool = typer.Option(True, "--deletion/--no-deletion", help="Include deletion summaries."),
            window: Optional[str] = WINDOW, device_map: Optional[str] = DEVICE_MAP):
    """Compare two models side by side: growth with CIs and their difference, position 0, writes, weights, deletion."""
    from .compare import compare_documents, format_comparison, plot_comparison
    from .models import load_model
    from .report import report_document
    from .results import atomic_write_json
    from .weights import run_weights

    sides = []
    for spec in (model_a, model_b):
        res, loaded = _collect_or_load(spec, data, n_seqs, seq_len, batch_size, device, dtype, out,
                                       device_map=device_map)
        rep = report_document(res, window)

        def weights_doc(spec=spec, loaded=loaded, res=res):
            m = loaded or load_model(spec, device=device, dtype=dtype, device_map=device_map)
            return run_weights(m, results=res)[0]["weights"]

        w = _cached_json("weights", spec, None, data, {"n_seqs": n_seqs, "seq_len": seq_len, "dtype": dtype}, out,
                         weights_doc)
        d = (_deletion_doc(spec, data, n_seqs, seq_len, batch_size, device, dtype, out, None, None, loaded,
                           device_map)[0]
             if with_deletion else None)
        sides.append((res, rep, w, d))
    (ra, pa, wa, da), (rb, pb, wb, db) = sides
    doc = compare_documents(ra, rb, pa, pb, wa, wb, da, db)
    _echo(format_comparison(doc))
    if json_path is not None:
        atomic_write_json(json_path, doc)
        typer.echo(f"wrote {json_path}", err=True)
    if figure is not None:
        for path in plot_comparison(doc, figure):
            typer.echo(f"wrote {path}", err=True)


@app.command("fit")
def fit_command(curve: Path = typer.Argument(..., help="CSV (one column, or columns layer,value) or JSON list of per-layer norms."),
                window: Optional[str] = WINDOW, json_path: Optional[Path] = JSON,
                n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples (only for several curves).")):
    """Fit a per-layer norm curve measured elsewhere (e.g. a published one)."""
    from .fit import fit_growth, format_fit_table, parse_window, read_curve
    from .results import atomic_write_json

    values = read_curve(curve)
    win = parse_window(window, len(values)) if window else None
    fit = fit_growth(values, window=win, n_boot=n_boot)
    _echo(f"{curve}: {len(values)} layers")
    _echo(format_fit_table({curve.stem: fit}))
    a, b = fit.window
    _echo(f"endpoint estimate (n[{b}]/n[{a}])^(1/{b - a}) = {fit.endpoint_growth_factor:.6f}")
    if json_path is not None:
        atomic_write_json(json_path, fit.to_json())
        typer.echo(f"wrote {json_path}", err=True)


@zoo_app.command("build")
def zoo_build(out: Path = typer.Option(Path("zoo"), "--out", help="Directory for ln/, noln/ and zoo.json."),
              tiny: bool = typer.Option(False, "--tiny", help="A seconds-long toy build (for tests and smoke runs)."),
              force: bool = typer.Option(False, "--force", help="Rebuild even when a matching pair is cached.")):
    """Train the offline pair: a small GPT-2 on stdlib docstrings and its LN-free twin (cached)."""
    from .zoo import ZooSettings, build_pair

    settings = ZooSettings.tiny() if tiny else ZooSettings()
    result = build_pair(out, settings, progress=lambda msg: typer.echo(msg, err=True), force=force)
    _echo(f"LN model      {result['ln']}: held-out loss {result['ln_heldout_loss']:.4f} nats/token")
    _echo(f"LN-free twin  {result['noln']}: held-out loss {result['noln_heldout_loss']:.4f} nats/token "
          f"({100 * (result['noln_heldout_loss'] / result['ln_heldout_loss'] - 1):+.1f} %)")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    from .errors import NormgrowthError

    warnings.showwarning = lambda message, category, *a, **k: typer.echo(f"warning: {message}", err=True)
    try:
        app()  # click's standalone mode handles usage errors (exit 2) and exits
    except NormgrowthError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
