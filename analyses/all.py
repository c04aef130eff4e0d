"""Draw every figure: ``python analyses/all.py --results results --out figures``.

Runs each figure script's ``main(results_dir, out_dir)`` in turn. A script whose inputs are absent prints
a note and is skipped; any other error is reported, the remaining figures are still drawn, and the run
then fails (exit status 1) naming the scripts that failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

SCRIPTS = ("fig_real_model",  # the real pretrained model (R/models/smollm2-135m/) first
           "fig_norms", "fig_growth_ratio", "fig_position", "fig_components", "fig_weights", "fig_random_gains",
           "fig_deletion", "fig_reading", "fig_locality", "fig_compare", "fig_summary")
SCRIPTS += ("fig_horizon",)  # the effective layer horizon (R/models/<slug>/horizon.json)
# Figures of training runs: they read R/sweep*.json (normgrowth sweep), R/zoo.json (the zoo build's record) and
# R/real-twin/trace.json (make real-twin; skipped when absent).
TRAINING_SCRIPTS = ("fig_training", "fig_ln_removal", "fig_real_twin")
ALL_SCRIPTS = SCRIPTS + TRAINING_SCRIPTS


class FigureError(RuntimeError):
    """One or more figure scripts raised."""


def make_all(results_dir: str | Path = "results", out_dir: str | Path = "figures",
             scripts: Sequence[str] = ALL_SCRIPTS) -> list[Path]:
    """Run every figure script; return the files written. Raises FigureError after all ran if any failed."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    written: list[Path] = []
    failed: list[tuple[str, BaseException]] = []
    for name in scripts:
        module = importlib.import_module(name)
        try:
            written += module.main(results_dir, out_dir)
        except Exception as err:  # noqa: BLE001 - reported below and re-raised as FigureError
            traceback.print_exc()
            failed.append((name, err))
    skipped = [s for s in scripts if not any(p.stem == s for p in written)]
    print(f"figures: {len(written)} files from {len(scripts) - len(skipped)} of {len(scripts)} scripts in {out_dir}"
          + (f" (not drawn: {', '.join(skipped)})" if skipped else ""))
    if failed:
        raise FigureError("figure script(s) failed: " + "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in failed)) \
            from failed[0][1]
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="results directory (default: results)")
    parser.add_argument("--out", default="figures", help="output directory (default: figures)")
    parser.add_argument("--only", nargs="*", choices=ALL_SCRIPTS, help="draw only these figures")
    args = parser.parse_args(argv)
    try:
        make_all(args.results, args.out, args.only or ALL_SCRIPTS)
    except FigureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
