"""Command line: ``normgrowth report | weights | fit | deletion | compare | sweep | zoo build | zoo twin``.

The commands parse their options, call :mod:`normgrowth.pipeline` (which loads, caches and computes) and
print; progress bars and notes go to stderr. Heavy libraries (torch, transformers, TransformerLens) are
imported inside the commands, so ``normgrowth --help`` answers at once. A :class:`NormgrowthError` becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .pipeline import RANDOM_LEN, RANDOM_SEQS  # the pipeline module imports nothing heavy

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure, fit and explain residual-stream norm growth in transformers.")
zoo_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The offline model pair (with / without LayerNorm).")
app.add_typer(zoo_app, name="zoo")

MODEL = typer.Argument(..., help="Hugging Face hub name, local checkpoint directory, .gguf file, or smollm2-135m.")
DATA = typer.Option("builtin", "--data", help="builtin (prose windows, --n-seqs x --seq-len) | prompts (59 short prompts) | file.txt | file.jsonl | tokens.npy/.pt | HF dataset name.")
N_SEQS = typer.Option(None, "--n-seqs", help="Use at most this many sequences.")
SEQ_LEN = typer.Option(None, "--seq-len", help="Truncate sequences to this many tokens.")
BATCH = typer.Option("8", "--batch-size", help="Sequences per forward pass, or 'auto' (sized from free memory).")
DEVICE_MAP = typer.Option(None, "--device-map", help="Spread a model too large for one GPU over all visible GPUs "
                                                     "('auto', through accelerate); replaces --device.")
DEVICE = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda when available).")
DTYPE = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 (norms accumulate in float32).")
OUT = typer.Option(None, "--out", help="Results directory: cached results are reused, new ones saved there.")
JSON = typer.Option(None, "--json", help="Write the JSON summary here.")
CHECKPOINT = typer.Option(None, "--checkpoint-every", help="With --out: save the collection state every N batches "
                                                             "(default: about every 3 minutes); rerunning "
                                                             "after a crash resumes there.")
REVISION = typer.Option(None, "--revision", help="Hub revision (branch, tag, commit).")
WINDOW = typer.Option(None, "--window", help="Fit window a:b (inclusive layer indices; default skips the first "
                                              "layers and the last).")


def _main_process() -> bool:
    """False in the ranks > 0 of a torchrun launch: only rank 0 prints and writes."""
    from .distributed import is_main

    return is_main()


def _echo(text: str) -> None:
    if _main_process():
        typer.echo(text)


def progress_text(done: int, total: Optional[int], tokens: Optional[int], start: tuple[float, int, int],
              now: float) -> str:
    """'<tokens/s> tok/s, <m:ss> left' from the progress since ``start = (time, done, tokens)``: rate =
    tokens since start / seconds since start; time left = (total - done) x seconds per sequence since start."""
    t0, done0, tokens0 = start
    elapsed = now - t0
    if elapsed <= 0 or done <= done0:
        return ""
    parts = []
    if tokens is not None:
        parts.append(f"{(tokens - tokens0) / elapsed:,.0f} tok/s")
    if total:
        left = int(round((total - done) * elapsed / (done - done0)))
        parts.append(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left" if left >= 3600
                     else f"{left // 60}:{left % 60:02d} left")
    return ", ".join(parts)


def _reporter():
    """A pipeline progress callback: notes as lines on stderr, each streaming pass as a bar on stderr with
    tokens per second and the time left (measured from the pass's first advance, so a resumed run's
    earlier work does not count); None in ranks > 0 of a torchrun launch."""
    if not _main_process():
        return None
    import time

    bars: dict[str, list] = {}

    def on_event(event) -> None:
        if event.kind == "note":
            typer.echo(event.text, err=True)
        elif event.kind == "start":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn(event.text), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TextColumn("{task.fields[rate]}"), transient=True, console=Console(stderr=True))
            bars[event.text] = [bar, bar.add_task(event.text, total=None, rate=""), None]
            bar.start()
        elif event.kind == "advance" and event.text in bars:
            entry = bars[event.text]
            bar, task, start = entry
            now = time.perf_counter()
            if start is None:
                entry[2] = start = (now, event.done, event.tokens or 0)
            bar.update(task, completed=event.done, total=event.total,
                       rate=progress_text(event.done, event.total, event.tokens, start, now))
        elif event.kind == "end" and event.text in bars:
            bars.pop(event.text)[0].stop()

    return on_event


def _write_json(path: Optional[Path], doc) -> None:
    if path is not None and _main_process():
        from .storage import atomic_write_json

        atomic_write_json(path, doc)
        typer.echo(f"wrote {path}", err=True)


@app.command()
def report(model: str = MODEL, data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
           batch_size: str = BATCH, device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
           json_path: Optional[Path] = JSON, window: Optional[str] = WINDOW,
           revision: Optional[str] = REVISION,
           device_map: Optional[str] = DEVICE_MAP, checkpoint_every: Optional[int] = CHECKPOINT):
    """Collect residual-stream norms per layer and print the per-layer table and growth fits."""
    from .pipeline import run_report

    run = run_report(model, data, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype,
                     out=out, revision=revision, device_map=device_map, window=window, progress=_reporter(),
                     checkpoint_every=checkpoint_every)
    _echo(run.text())
    if json_path is not None:
        _write_json(json_path, run.document())


@app.command()
def weights(model: str = MODEL,
            data: Optional[str] = typer.Option(None, "--data", help="Also collect real statistics on this data "
                                                                    "to compare random-input gains with (see report)."),
            n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN, batch_size: str = BATCH,
            device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
            json_path: Optional[Path] = JSON, window: Optional[str] = WINDOW,
            random_inputs: bool = typer.Option(True, "--random/--no-random", help="Feed N(0,1) inputs through "
                                                                                 "every attention and MLP."),
            random_seqs: int = typer.Option(RANDOM_SEQS, "--random-seqs", help="Sequences of random inputs."),
            random_len: int = typer.Option(RANDOM_LEN, "--random-len", help="Positions per random sequence."),
            revision: Optional[str] = REVISION, device_map: Optional[str] = DEVICE_MAP,
            checkpoint_every: Optional[int] = CHECKPOINT):
    """Weight norms per layer (W_OV per head, W_in, W_out, biases, gains) with growth fits; random-input gains."""
    from .pipeline import run_weights

    run = run_weights(model, data, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, device=device,
                      dtype=dtype, out=out, revision=revision, device_map=device_map, window=window,
                      random_inputs=random_inputs, random_seqs=random_seqs, random_len=random_len,
                      progress=_reporter(), checkpoint_every=checkpoint_every)
    _echo(run.text())
    _write_json(json_path, run.document())


@app.command()
def deletion(model: str = MODEL, data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
             batch_size: str = BATCH, device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
             json_path: Optional[Path] = JSON,
             ablate: Optional[str] = typer.Option("default", "--ablate", help="Writes to mean-ablate: block numbers "
                                                  "(0,3,6), labels (embed,mlp_out.3), 'default' (~6 spread blocks), "
                                                  "'all', or 'none'."),
             revision: Optional[str] = REVISION, device_map: Optional[str] = DEVICE_MAP,
             checkpoint_every: Optional[int] = CHECKPOINT):
    """Deletion by magnitude: retention, dilution, visibility, reading shares, locality, ablations."""
    from .pipeline import run_deletion

    run = run_deletion(model, data, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, device=device,
                       dtype=dtype, out=out, revision=revision, device_map=device_map, ablate=ablate,
                       progress=_reporter(), checkpoint_every=checkpoint_every)
    _echo(run.text())
    _write_json(json_path, run.document())


@app.command()
def horizon(model: str = MODEL, data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
            batch_size: str = typer.Option("4", "--batch-size", help="Sequences per forward pass, or 'auto'."),
            device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
            json_path: Optional[Path] = JSON,
            horizons: Optional[str] = typer.Option(None, "--horizons", help="Horizons n (layers) to measure, e.g. "
                                                   "1,2,4,8 (default: 1,2,3,4,6,8,12,16,24,... below n_layers; "
                                                   "n_layers, the clean model, is always added)."),
            causal: str = typer.Option("default", "--causal", help="Writes to mean-ablate in the causal check: "
                                       "'default' (8 spread over depth), labels (embed,mlp_out.3), block numbers, "
                                       "'all' or 'none'."),
            n_calib: Optional[int] = typer.Option(None, "--calib-seqs", help="Sequences for the means (default: a "
                                                  "quarter); the rest are evaluated."),
            revision: Optional[str] = typer.Option(None, "--revision"), device_map: Optional[str] = DEVICE_MAP):
    """Effective layer horizon: loss when every reader sees only the last n layers, with live and frozen norm scales."""
    from .pipeline import run_horizon

    run = run_horizon(model, data, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype,
                      out=out, revision=revision, device_map=device_map, horizons=horizons, causal=causal,
                      n_calib=n_calib, progress=_reporter())
    _echo(run.text())
    _write_json(json_path, run.document())


@app.command()
def compare(model_a: str = typer.Argument(..., help="Model A (e.g. with LayerNorm)."),
            model_b: str = typer.Argument(..., help="Model B (e.g. its LN-free twin)."),
            data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN,
            batch_size: str = BATCH, device: Optional[str] = DEVICE, dtype: str = DTYPE, out: Optional[Path] = OUT,
            json_path: Optional[Path] = JSON,
            figure: Optional[Path] = typer.Option(None, "--figure", help="Write the comparison figure here (.png + .pdf)."),
            with_deletion: bool = typer.Option(True, "--deletion/--no-deletion", help="Include deletion summaries."),
            window: Optional[str] = WINDOW, revision: Optional[str] = REVISION,
            device_map: Optional[str] = DEVICE_MAP, checkpoint_every: Optional[int] = CHECKPOINT):
    """Compare two models side by side: growth with CIs and their difference, position 0, writes, weights, deletion."""
    from .pipeline import run_compare

    run = run_compare(model_a, model_b, data, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size, device=device,
                      dtype=dtype, out=out, revision=revision, device_map=device_map, window=window,
                      with_deletion=with_deletion, progress=_reporter(), checkpoint_every=checkpoint_every)
    _echo(run.text())
    _write_json(json_path, run.document())
    if figure is not None and _main_process():
        from .compare import plot_comparison

        for path in plot_comparison(run.document(), figure):
            typer.echo(f"wrote {path}", err=True)


@app.command()
def sweep(checkpoints: list[str] = typer.Argument(..., help="Checkpoint folders, parent folders of step-<N> / "
                                                             "step<N> / checkpoint-<N> subfolders, or hub names."),
          revisions: Optional[str] = typer.Option(None, "--revisions", help="Hub revisions, comma-separated "
                                                  "(e.g. step0,step512,step143000)."),
          data: str = DATA, n_seqs: Optional[int] = N_SEQS, seq_len: Optional[int] = SEQ_LEN, batch_size: str = BATCH,
          device: Optional[str] = DEVICE, dtype: str = DTYPE,
          out: Optional[Path] = typer.Option(None, "--out", help="Results directory: every point is cached there, "
                                                                 "so an interrupted sweep resumes."),
          json_path: Optional[Path] = JSON, window: Optional[str] = WINDOW,
          with_weights: bool = typer.Option(True, "--weights/--no-weights", help="Include weight-norm growth fits."),
          with_deletion: bool = typer.Option(True, "--deletion/--no-deletion", help="Include the deletion verdict."),
          revision: Optional[str] = typer.Option(None, "--revision", help="One hub revision for every "
                                                 "checkpoint (the same as --revisions with one name)."),
          device_map: Optional[str] = DEVICE_MAP, checkpoint_every: Optional[int] = CHECKPOINT):
    """Growth fits (as in report), weight-norm growth and the deletion verdict at every checkpoint, in step order."""
    from .pipeline import run_sweep

    run = run_sweep(checkpoints, data, revisions=revisions, n_seqs=n_seqs, seq_len=seq_len, batch_size=batch_size,
                    device=device, dtype=dtype, out=out, revision=revision, device_map=device_map, window=window,
                    with_weights=with_weights, with_deletion=with_deletion, progress=_reporter(),
                    checkpoint_every=checkpoint_every)
    _echo(run.text())
    _write_json(json_path, run.document())


@app.command("fit")
def fit_command(curve: Path = typer.Argument(..., help="CSV (one column, or columns layer,value) or JSON list of per-layer norms."),
                window: Optional[str] = WINDOW, json_path: Optional[Path] = JSON,
                column: Optional[str] = typer.Option(None, "--column", help="CSV column to fit (e.g. resid_post).")):
    """Fit a per-layer norm curve measured elsewhere (e.g. a published one); one curve, so the CI is the
    least-squares slope's standard error (docs/fit.md)."""
    from .fit import fit_growth, format_fit_table, parse_window, read_curve
    from .laws import format_law_table

    values = read_curve(curve, column)
    win = parse_window(window, len(values)) if window else None
    fit = fit_growth(values, window=win)
    _echo(f"{curve}: {len(values)} layers")
    _echo(format_fit_table({curve.stem: fit}))
    a, b = fit.window
    _echo(f"endpoint estimate (n[{b}]/n[{a}])^(1/{b - a}) = {fit.endpoint_growth_factor:.6f}")
    _echo(f"\ngrowth laws over layers {a}..{b} (an interpretation; the model-free numbers above come first):")
    _echo(format_law_table({curve.stem: fit.law}))
    _write_json(json_path, fit.to_json())


@zoo_app.command("build")
def zoo_build(out: Path = typer.Option(Path("zoo"), "--out", help="Directory for ln/, noln/ and zoo.json."),
              tiny: bool = typer.Option(False, "--tiny", help="A seconds-long toy build (for tests and smoke runs)."),
              force: bool = typer.Option(False, "--force", help="Rebuild even when a matching pair is cached."),
              seeds: int = typer.Option(1, "--seeds", help="Independent LN model / twin / control triples "
                                                         "(seeds 0..n-1; extra ones under OUT/seeds/).")):
    """Train the offline models: a small GPT-2 on stdlib docstrings, its LN-free twin, the LN-kept control."""
    from .zoo import ZooSettings, build_seeds

    settings = ZooSettings.tiny() if tiny else ZooSettings()
    results = build_seeds(out, settings, seeds, progress=lambda msg: typer.echo(msg, err=True), force=force)
    for result in results:
        ln = result["ln_heldout_loss"]
        _echo(f"seed {result['meta']['settings']['seed']}")
        _echo(f"  LN model      {result['ln']}: held-out loss {ln:.4f} nats/token")
        _echo(f"  LN-free twin  {result['noln']}: held-out loss {result['noln_heldout_loss']:.4f} nats/token "
              f"({100 * (result['noln_heldout_loss'] / ln - 1):+.1f} %)")
        if result.get("control") is not None:
            _echo(f"  control       {result['control']}: held-out loss {result['control_heldout_loss']:.4f} "
                  f"nats/token (LayerNorm kept, the twin's fine-tuning schedule)")


@zoo_app.command("twin")
def zoo_twin(model: str = typer.Argument(..., help="Local HF checkpoint folder, .gguf file or smollm2-135m."),
             out: Path = typer.Option(Path("zoo-real"), "--out", help="Directory for twin/, control/ and twin.json."),
             schedule: str = typer.Option("reduced", "--schedule", help="reduced (2 CPU cores) or full (GPU)."),
             steps_per_norm: Optional[int] = typer.Option(None, "--steps-per-norm", help="AdamW steps after each "
                                                          "frozen norm (default: the schedule's)."),
             recovery_steps: Optional[int] = typer.Option(None, "--recovery-steps", help="Steps after the last norm."),
             lr: Optional[float] = typer.Option(None, "--lr", help="Fine-tuning learning rate."),
             scale_penalty: Optional[float] = typer.Option(None, "--scale-penalty", help="Weight of the scale "
                                                           "penalty on norm inputs (0: none; default 10)."),
             phase_window: Optional[float] = typer.Option(None, "--phase-window", help="Blocks in transition at a "
                                                          "time while the special scale is phased out, from the "
                                                          "embedding up (0: every norm at once; default 4)."),
             seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
             device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the schedule's).")):
    """Remove every norm of a pre-norm model one at a time (its norm-free twin) and fine-tune a control on the
    same schedule with the norms kept."""
    from .errors import NormgrowthError
    from .zoo.twin import TwinSettings, build_twin

    presets = {"reduced": TwinSettings.reduced, "full": TwinSettings.full}
    if schedule not in presets:
        raise NormgrowthError(f"--schedule must be 'reduced' or 'full', got {schedule!r}.")
    overrides = {k: v for k, v in dict(steps_per_norm=steps_per_norm, recovery_steps=recovery_steps, lr=lr,
                                       scale_penalty=scale_penalty, phase_window=phase_window,
                                       device=device).items() if v is not None}
    settings = presets[schedule](seed=seed, **overrides)
    record = build_twin(model, out, settings, progress=lambda msg: typer.echo(msg, err=True))
    _echo(f"{record['fine_tuning_steps']} fine-tuning steps per run ({schedule} schedule), "
          f"{len(record['sites'])} norms removed")
    for name in ("base", "twin", "control"):
        _echo(f"  {name:8s} held-out loss {record[name]['heldout_loss']:.4f} nats/token, "
              f"growth per layer {record[name]['growth_per_layer']:.4f}")
    _echo(f"  twin - control: {record['twin_minus_control_loss']:+.4f} nats/token")


def _warning_printer():
    """A ``warnings.showwarning`` that prints each distinct warning once per run, as one line on stderr
    (``warning: <message>``, no source line)."""
    seen: set[str] = set()

    def show(message, category, *args, **kwargs) -> None:
        text = " ".join(str(message).split())
        if text not in seen and _main_process():
            seen.add(text)
            typer.echo(f"warning: {text}", err=True)

    return show


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    from .errors import NormgrowthError

    warnings.showwarning = _warning_printer()
    try:
        app()  # click's standalone mode handles usage errors (exit 2) and exits
    except NormgrowthError as err:
        if _main_process():  # under torchrun rank 0 also names another rank's failure
            typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        from .distributed import close

        close()


if __name__ == "__main__":
    main()
