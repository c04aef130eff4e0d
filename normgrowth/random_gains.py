"""Layer gains on random inputs: each attention and MLP output norm when the block's norms see seeded random
vectors instead of the stream (one forward pass), and their comparison with a collection's real outputs.

Formulas in ``docs/weights.md``; :func:`normgrowth.weights.analyse_weights` runs this with the weight norms.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch

from .collector import mlp_active_fraction
from .errors import NormgrowthError

# Random-input pass: which norm a hook site feeds, and its index in the seed (pre / peri placement with a
# norm per sublayer; see random_sites for the other layouts).
RANDOM_SITES: tuple[tuple[str, str, int], ...] = (("ln1_in", "attn", 0), ("ln2_in", "mlp", 1))


def random_sites(model: Any) -> tuple[tuple[str, str, int], ...]:
    """The (hook site, sublayer, seed index) pairs whose input the random-input pass replaces.

    A sublayer with an input norm gets the random vectors as that norm's argument (``ln1_in`` / ``ln2_in``);
    parallel blocks sharing one norm get them once, at ``ln1_in`` (both sublayers read its output); a
    sublayer without an input norm (output-only placement, OLMo 2) gets them as its own input
    (``attn_in`` / ``mlp_in``), so there the input scale matters.
    """
    attn = ("ln1_in" if model.input_norm else "attn_in", "attn", 0)
    if model.mlp_norm:
        return (attn, ("ln2_in", "mlp", 1))
    if model.input_norm:  # parallel blocks sharing ln1
        return (attn,)
    return (attn, ("mlp_in", "mlp", 1))


def standardised_normal(shape: Sequence[int], std: float, seed: int) -> torch.Tensor:
    """Seeded float32 ``z ~ N(0, 1)``, each last-axis vector centred and scaled to population std ``std``.

    ``z_t <- std * (z_t - mean(z_t)) / sqrt(mean((z_t - mean(z_t))^2))``: every token then has mean 0
    and centred std (= RMS) exactly ``std``, the quantity a LayerNorm, an RMSNorm and an LN-free norm
    divide by (or, LN-free, do not divide by).
    """
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(*shape, generator=gen, dtype=torch.float32)
    z = z - z.mean(dim=-1, keepdim=True)
    z = z / z.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return z * float(std)


def _random_seed(seed: int, layer: int, site_index: int) -> int:
    """A distinct, reproducible torch seed for each (seed, layer, norm)."""
    return int(np.random.SeedSequence([int(seed), int(layer), int(site_index)]).generate_state(1)[0])


StdSpec = Union[None, float, Sequence[float], Mapping[str, Any]]


def _resolve_input_std(model: Any, input_std: StdSpec) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-layer centred std of the random vectors fed to (attention norm, MLP norm), and its source."""
    n = model.n_layers

    def as_layers(v: Any, what: str) -> np.ndarray:
        arr = np.asarray(v, dtype=np.float64)
        if arr.ndim == 0:
            arr = np.full(n, float(arr))
        if arr.shape != (n,):
            raise NormgrowthError(f"input_std {what} has shape {arr.shape}: give one value per layer ({n}).")
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise NormgrowthError(f"input_std {what} must be positive and finite: pass the real inputs' stds.")
        return arr

    if input_std is None:
        if not model.input_norm:
            warnings.warn(f"model {model.spec!r} has no input norms (its sublayers read the raw stream), so the "
                          "random-input gains are for unit-std inputs; pass input_std (e.g. "
                          "input_std_from_results(results, model)) to use the real inputs' scale.")
            return np.ones(n), np.ones(n), "unit (no input norm: outputs depend on this scale)"
        if model.ln_free:
            warnings.warn(f"model {model.spec!r} is LN-free: its norms do not remove the input scale, so the "
                          "random-input gains are for unit-std inputs; pass input_std (e.g. "
                          "input_std_from_results(results, model)) to use the real inputs' scale.")
            return np.ones(n), np.ones(n), "unit (LN-free without input_std: outputs depend on this scale)"
        return np.ones(n), np.ones(n), "unit (the norm removes the scale)"
    if isinstance(input_std, Mapping):
        missing = {"attn", "mlp"} - set(input_std)
        if missing:
            raise NormgrowthError(f"input_std lacks {sorted(missing)}: give {{'attn': [..], 'mlp': [..]}} per layer.")
        return as_layers(input_std["attn"], "['attn']"), as_layers(input_std["mlp"], "['mlp']"), "given"
    arr = as_layers(input_std, "")
    return arr, arr.copy(), "given"


def input_std_from_results(results: Any, model: Any) -> dict[str, np.ndarray]:
    """Typical centred std of each norm's real input: ``centered_mean / sqrt(d_model)`` per layer.

    ``centered_mean`` is the mean over tokens of ``||x - mean(x)||``, so dividing by ``sqrt(d_model)``
    gives the (token-averaged) centred std. The attention norm reads ``resid_pre``; the MLP norm reads
    ``resid_mid``, or ``resid_pre`` for parallel blocks.
    """
    d = math.sqrt(model.d_model)
    pre = results.sites["resid_pre"]
    mid_site = "resid_pre" if model.parallel_blocks else "resid_mid"
    mid = results.sites.get(mid_site) if isinstance(results.sites, Mapping) else results.sites[mid_site]
    if pre is None or mid is None:
        raise NormgrowthError(f"results lack resid_pre/{mid_site} statistics: collect them before computing input_std.")
    return {"attn": np.asarray(pre.centered_mean, dtype=np.float64) / d,
            "mlp": np.asarray(mid.centered_mean, dtype=np.float64) / d}


def random_token_ids(model: Any, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[n_seqs, seq_len]`` seeded random ids, BOS at position 0 when the model has one."""
    gen = torch.Generator().manual_seed(int(seed))
    tokens = torch.randint(0, model.vocab_size, (n_seqs, seq_len), generator=gen)
    if model.bos_token_id is not None and 0 <= model.bos_token_id < model.vocab_size:
        tokens[:, 0] = model.bos_token_id
    return tokens


def random_input_gains(model: Any, *, n_seqs: int, seq_len: int, seed: int = 0,
                       input_std: StdSpec = None) -> dict:
    """Attention/MLP output norms per layer when every block's norms see random vectors (one forward).

    Hooks on ``ln1_in``/``ln2_in`` replace each norm's argument by ``standardised_normal`` vectors
    (seeded per layer and norm; centred std ``input_std``, 1 by default) without touching the
    stream. Returned per layer: ``attn_out``/``mlp_out`` = mean over non-position-0 tokens of the
    L2 norm of the attention/MLP write; ``mlp_act_rate`` = fraction of ``mlp_pre`` entries > 0 over
    the same tokens. ``input_std`` is a number, one value per layer, or ``{"attn": [..], "mlp": [..]}``;
    it only matters for LN-free models (see :func:`input_std_from_results`).
    """
    if n_seqs < 1:
        raise NormgrowthError(f"n_seqs is {n_seqs}: use at least 1 random sequence.")
    if seq_len < 2 or seq_len > model.n_ctx:
        raise NormgrowthError(f"seq_len is {seq_len}: use 2 to {model.n_ctx} tokens (position 0 is left out).")
    from .weights import check_finite_gains  # weights imports this module

    check_finite_gains(model)
    std_attn, std_mlp, source = _resolve_input_std(model, input_std)
    stds = {"attn": std_attn, "mlp": std_mlp}
    n_layers = model.n_layers
    sums = {k: np.zeros(n_layers) for k in ("attn_out", "mlp_out")}
    active = np.zeros(n_layers)
    pre_count = np.zeros(n_layers)
    n_tokens = n_seqs * (seq_len - 1)

    def replace(layer: int, kind: str, site_index: int):
        def fn(act: torch.Tensor) -> torch.Tensor:
            z = standardised_normal(act.shape, float(stds[kind][layer]), _random_seed(seed, layer, site_index))
            return z.to(device=act.device, dtype=act.dtype)
        return fn

    def record_norm(layer: int, key: str):
        def fn(act: torch.Tensor) -> None:
            norms = torch.linalg.vector_norm(act[:, 1:].to(torch.float32), dim=-1)
            sums[key][layer] += float(norms.sum(dtype=torch.float64))
        return fn

    def record_pre(layer: int):
        def fn(act: torch.Tensor) -> None:
            rates = mlp_active_fraction(act[:, 1:])  # [batch, pos - 1]
            active[layer] += float(rates.sum(dtype=torch.float64))
            pre_count[layer] += rates.numel()
        return fn

    moe = bool(getattr(model, "moe", False))  # a mixture of experts has no single pre-activation to count
    hooks = []
    for l in range(n_layers):
        for site, kind, idx in random_sites(model):
            hooks.append((site, l, replace(l, kind, idx)))
        hooks.append(("attn_out", l, record_norm(l, "attn_out")))
        hooks.append(("mlp_out", l, record_norm(l, "mlp_out")))
        if not moe:
            hooks.append(("mlp_pre", l, record_pre(l)))
    tokens = random_token_ids(model, n_seqs, seq_len, seed)
    with torch.no_grad(), model.hooks(hooks):
        model.forward(tokens, logits=False)
    if not moe and np.any(pre_count == 0):
        raise NormgrowthError("the mlp_pre hook did not fire in every layer: this architecture is not supported.")
    return {
        "attn_out": (sums["attn_out"] / n_tokens).tolist(),
        "mlp_out": (sums["mlp_out"] / n_tokens).tolist(),
        "mlp_act_rate": None if moe else (active / pre_count).tolist(),
        "input_std": {"attn": std_attn.tolist(), "mlp": std_mlp.tolist()},
        "input_std_source": source,
        "n_seqs": int(n_seqs), "seq_len": int(seq_len), "seed": int(seed), "n_tokens": int(n_tokens),
        "model": str(model.spec), "ln_free": bool(model.ln_free),
    }


def compare_gains(random_gains: Mapping[str, Any], results: Any, window: Any = None) -> dict:
    """Random-input outputs next to the real ones, per layer, plus growth fits of the random series.

    ``ratio_attn = real attn_out / random attn_out`` (``results.sites["attn_out"].mean``), likewise
    ``ratio_mlp``; activation rates side by side (``results.mlp_act_rate``). Per-layer values are
    lists; ``"fit"`` maps ``random_attn_out``/``random_mlp_out`` to GrowthFit objects (use
    :func:`comparison_to_json` for a JSON-ready copy).
    """
    rnd_attn = np.asarray(random_gains["attn_out"], dtype=np.float64)
    rnd_mlp = np.asarray(random_gains["mlp_out"], dtype=np.float64)
    n = rnd_attn.shape[0]
    real_attn = _site_mean(results, "attn_out", n)
    real_mlp = _site_mean(results, "mlp_out", n)
    real_rate = None if results.mlp_act_rate is None else np.asarray(results.mlp_act_rate, dtype=np.float64)
    if real_rate is not None and real_rate.shape != (n,):
        raise NormgrowthError(f"results.mlp_act_rate has shape {real_rate.shape} but the random pass has {n} layers: "
                              "compare a model with its own results.")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_attn = np.where(rnd_attn > 0, real_attn / rnd_attn, np.nan)
        ratio_mlp = np.where(rnd_mlp > 0, real_mlp / rnd_mlp, np.nan)
    from .weights import fit_series  # the weight series' fit (weights imports this module)

    fits, skipped = fit_series({"random_attn_out": rnd_attn, "random_mlp_out": rnd_mlp}, window)
    return {
        "random_attn_out": rnd_attn.tolist(), "real_attn_out": real_attn.tolist(), "ratio_attn": ratio_attn.tolist(),
        "random_mlp_out": rnd_mlp.tolist(), "real_mlp_out": real_mlp.tolist(), "ratio_mlp": ratio_mlp.tolist(),
        "random_act_rate": (None if random_gains.get("mlp_act_rate") is None
                            else list(map(float, random_gains["mlp_act_rate"]))),
        "real_act_rate": None if real_rate is None else real_rate.tolist(),
        "fit": fits, "fit_skipped": skipped,
    }


def comparison_to_json(comparison: Mapping[str, Any]) -> dict:
    """A :func:`compare_gains` dict with its GrowthFit objects replaced by their ``to_json()``."""
    out = dict(comparison)
    out["fit"] = {k: f.to_json() for k, f in comparison["fit"].items()}
    return out


def _site_mean(results: Any, site: str, n: int) -> np.ndarray:
    stats = results.sites[site]
    if stats is None:
        raise NormgrowthError(f"results have no {site} statistics: collect {site} to compare with random inputs.")
    arr = np.asarray(stats.mean, dtype=np.float64)
    if arr.shape != (n,):
        raise NormgrowthError(f"results {site} has {arr.shape} layers but the random pass has {n}: "
                              "compare a model with its own results.")
    return arr


def format_gain_table(comparison_or_gains: Mapping[str, Any]) -> str:
    """Per-layer table of random-input gains (with the real values when given a compare_gains dict)."""
    from .weights import _fit_table, _fmt, _table  # the weight tables' layout (weights imports this module)

    c = comparison_or_gains
    if "random_attn_out" in c:
        cols = [("rand_attn", c["random_attn_out"]), ("real_attn", c["real_attn_out"]), ("real/rand", c["ratio_attn"]),
                ("rand_mlp", c["random_mlp_out"]), ("real_mlp", c["real_mlp_out"]), ("real/rand", c["ratio_mlp"]),
                ("rand_act", c["random_act_rate"])]
        if c["random_act_rate"] is None:  # mixture of experts: no single activation rate
            cols.pop()
        if c["real_act_rate"] is not None and c["random_act_rate"] is not None:
            cols.append(("real_act", c["real_act_rate"]))
    else:
        cols = [("rand_attn", c["attn_out"]), ("rand_mlp", c["mlp_out"])]
        if c["mlp_act_rate"] is not None:
            cols.append(("rand_act", c["mlp_act_rate"]))
    n = len(cols[0][1])
    rows = [[str(l)] + [_fmt(float(v[l])) for _, v in cols] for l in range(n)]
    out = _table(["layer"] + [name for name, _ in cols], rows)
    if "fit" in c:
        out += "\n\ngrowth fits of the random-input outputs\n" + _fit_table(c["fit"], c.get("fit_skipped", {}))
    return out
