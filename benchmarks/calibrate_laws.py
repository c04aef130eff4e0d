"""Calibration of the growth-law decision (normgrowth.laws) on planted curves.

Planted per-sequence curves ``x[s, l] = n(l) exp(u_s + e[s, l])``: ``n`` one of the planted truths below,
``u_s ~ N(0, 0.3^2)`` a per-sequence scale (it does not change a curve's shape in log space) and ``e`` a
stationary AR(1) process over layers (rho = 0.7) with standard deviation ``sigma``. ``sigma`` is set from
measured confidence intervals so that the bootstrap CI of the least-squares growth factor has the measured
width (:func:`sigma_for_ci`):

* ``zoo``: the zoo LN model's resid_post, 1.0159 [1.0143, 1.0174] over layers 1..6 with 59 sequences;
* ``real``: SmolLM2-135M's resid_post, +6.3 %/layer [6.1, 6.5] over layers 3..25 with 32 sequences.

Each replicate runs ``fit_growth`` on the planted sequences over the default window and records the law.
A decision is wrong when it names a law other than the truth, or "none" for a curve that follows a law;
for exponential-then-flat (which follows none of the four) any named law is wrong. "undecided" is never wrong.

    python benchmarks/calibrate_laws.py --reps 200 --out benchmarks/results/law_calibration.md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from normgrowth.fit import default_window, fit_growth
from normgrowth.numerics import DEFAULT_N_BOOT

RHO = 0.7
SCALE_SD = 0.3
TRUTHS = ("exponential", "linear", "power_origin1", "power_origin4", "saturating", "exp_then_flat")
DEPTHS = (8, 30, 48)
EXPECTED = {"exponential": "exponential", "linear": "linear", "power_origin1": "power", "power_origin4": "power",
            "saturating": "saturating", "exp_then_flat": None}
# measured CIs: (half-width of the CI of the log growth factor, window layers, sequences)
MEASURED = {"zoo": (0.5 * math.log(1.0174 / 1.0143), 6, 59), "real": (0.5 * math.log(1.065 / 1.061), 23, 32)}


def planted_curve(truth: str, n_layers: int) -> np.ndarray:
    """Noise-free planted norm curves over layers 0..L-1."""
    layer = np.arange(n_layers, dtype=np.float64)
    if truth == "exponential":
        return 10.0 * 1.05**layer
    if truth == "linear":
        return 10.0 + 1.0 * layer
    if truth == "power_origin1":
        return 5.0 * (layer + 1.0) ** 0.6
    if truth == "power_origin4":
        return (layer + 4.0) ** 1.5
    if truth == "saturating":
        return 58.0 - 10.0 * np.exp(-layer / (n_layers / 4.0))
    if truth == "exp_then_flat":
        return 10.0 * 1.08 ** np.minimum(layer, n_layers // 2)
    raise ValueError(f"unknown planted truth {truth!r}; expected one of {TRUTHS}")


def ar1_slope_sd(k: int, rho: float = RHO) -> float:
    """SD of the least-squares slope over k layers of a unit-variance stationary AR(1) series."""
    layer = np.arange(k, dtype=np.float64)
    c = (layer - layer.mean()) / ((layer - layer.mean()) ** 2).sum()
    cov = rho ** np.abs(layer[:, None] - layer[None, :])
    return float(math.sqrt(c @ cov @ c))


def sigma_for_ci(half_width: float, k: int, n_seqs: int) -> float:
    """Layer-noise SD that gives the mean curve's slope a 95 % CI of this half-width: SE = half / 1.96 and
    SE = sigma * ar1_slope_sd(k) / sqrt(n_seqs)."""
    return half_width / 1.959964 * math.sqrt(n_seqs) / ar1_slope_sd(k)


def noise_settings(name: str) -> tuple[float, int]:
    """(sigma, sequences) of a measured noise level ("zoo" or "real")."""
    half, k, n_seqs = MEASURED[name]
    return sigma_for_ci(half, k, n_seqs), n_seqs


def sample_sequences(curve: np.ndarray, n_seqs: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Planted per-sequence curves ``curve * exp(u_s + e[s, l])`` (module docstring)."""
    n_layers = curve.size
    e = np.empty((n_seqs, n_layers))
    e[:, 0] = rng.normal(0.0, 1.0, n_seqs)
    for j in range(1, n_layers):
        e[:, j] = RHO * e[:, j - 1] + math.sqrt(1 - RHO**2) * rng.normal(0.0, 1.0, n_seqs)
    return curve * np.exp(rng.normal(0.0, SCALE_SD, (n_seqs, 1)) + sigma * e)


def is_wrong(truth: str, label: str) -> bool:
    """A named law other than the truth, or "none" for a curve that follows a law."""
    expected = EXPECTED[truth]
    if label == "undecided":
        return False
    if expected is None:
        return label != "none"
    return label != expected


def calibrate(noise: str, reps: int, truths: Iterable[str] = TRUTHS, depths: Iterable[int] = DEPTHS,
              seed: int = 0, n_boot: int = DEFAULT_N_BOOT) -> list[dict]:
    """One row per (truth, depth): counts of each label over ``reps`` replicates and the wrong-decision count."""
    sigma, n_seqs = noise_settings(noise)
    rng = np.random.default_rng(seed)
    rows = []
    for truth in truths:
        for n_layers in depths:
            curve = planted_curve(truth, n_layers)
            counts: dict[str, int] = {}
            for _ in range(reps):
                x = sample_sequences(curve, n_seqs, sigma, rng)
                label = fit_growth(x, n_boot=n_boot, seed=int(rng.integers(2**31))).law.best
                counts[label] = counts.get(label, 0) + 1
            rows.append({"noise": noise, "sigma": sigma, "n_seqs": n_seqs, "truth": truth, "n_layers": n_layers,
                         "window": list(default_window(n_layers)), "reps": reps, "counts": counts,
                         "wrong": sum(c for label, c in counts.items() if is_wrong(truth, label))})
    return rows


def markdown_table(rows: list[dict]) -> str:
    labels = ("exponential", "linear", "power", "saturating", "none", "undecided")
    head = "| noise | truth | layers (window) | " + " | ".join(labels) + " | wrong |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [str(r["counts"].get(lab, 0)) for lab in labels]
        lines.append(f"| {r['noise']} | {r['truth']} | {r['n_layers']} ({r['window'][0]}:{r['window'][1]}) | "
                     + " | ".join(cells) + f" | {r['wrong']}/{r['reps']} ({100 * r['wrong'] / r['reps']:.1f} %) |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=DEFAULT_N_BOOT)
    parser.add_argument("--noise", default="zoo,real")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/law_calibration.md"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for noise in args.noise.split(","):
        rows += calibrate(noise, args.reps, n_boot=args.n_boot)
    settings = "; ".join(f"{n}: sigma {noise_settings(n)[0]:.4f}, {noise_settings(n)[1]} sequences"
                         for n in args.noise.split(","))
    text = (f"{markdown_table(rows)}\n\n{args.reps} replicates per row, {args.n_boot} bootstrap resamples, AR(1) rho "
            f"{RHO}, per-sequence scale SD {SCALE_SD}; {settings}; {time.perf_counter() - start:.0f} s.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
