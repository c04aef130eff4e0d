"""Building the offline pair: train the LN model, remove its LayerNorms, store both, cache the result.

Entry point: :func:`build_pair`, cached in ``out_dir/zoo.json`` by :func:`settings_hash`.
Checkpoints are built in a temporary folder and renamed into place; ``zoo.json`` is written last.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..errors import NormgrowthError
from ..storage import atomic_write_json
from .corpus import batch_stream, corpus_sha256, pack_sequences, split_docs, stdlib_docstrings, train_tokenizer
from .ln_removal import ln_sites, remove_layernorm, to_ln_free_storage
from .settings import ZOO_FORMAT_VERSION, ZooSettings, python_version, settings_hash
from .train import (Progress, checkpoint_steps, cosine_lr, evaluate, growth_per_layer, heldout_loss, make_config,
                    make_optimizer, resid_post_norms, train_steps)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_checkpoint(model: nn.Module, tokenizer: Any, path: Path) -> str:
    """``save_pretrained`` of model (safetensors) and tokenizer into ``path``; returns the weights' sha256."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"save_pretrained wrote no {weights}")
    return _sha256_file(weights)


def read_cache(out_dir: Path, settings: ZooSettings) -> Optional[dict]:
    """The recorded build when ``out_dir/zoo.json`` has this settings hash and both checkpoints are
    complete (weights' sha256 as recorded); otherwise None."""
    out_dir = Path(out_dir)
    meta_path = out_dir / "zoo.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("settings_hash") != settings_hash(settings):
        return None
    for name in checkpoint_names(meta):
        ckpt = out_dir / name
        weights = ckpt / "model.safetensors"
        if not ((ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file() and weights.is_file()):
            return None
        if _sha256_file(weights) != meta.get("weights_sha256", {}).get(name):
            return None
    return meta


def checkpoint_names(meta: dict) -> list[str]:
    """Every checkpoint folder a build record lists, relative to the zoo folder (``ln``, ``noln``,
    ``control``, ``train/step-<N>``)."""
    return list(meta.get("weights_sha256", {}) or {"ln": None, "noln": None})


def _remove_stale_builds(out_dir: Path) -> None:
    """Delete ``.building-<pid>-*`` folders left by killed builds (their process no longer runs)."""
    for tmp in out_dir.glob(".building-*"):
        try:
            pid = int(tmp.name.split("-")[1])
            os.kill(pid, 0)
            alive = True
        except (ValueError, IndexError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' info/warning chatter and progress bars during the build."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _result(out_dir: Path, meta: dict, cached: bool) -> dict:
    return {"ln": str(out_dir / "ln"), "noln": str(out_dir / "noln"), "zoo_json": str(out_dir / "zoo.json"),
            "control": str(out_dir / "control") if "control" in meta.get("weights_sha256", {}) else None,
            "train": str(out_dir / "train") if meta.get("train_checkpoint_steps") else None,
            "control_heldout_loss": meta.get("control_heldout_loss"),
            "ln_heldout_loss": meta["ln_heldout_loss"], "noln_heldout_loss": meta["noln_heldout_loss"],
            "settings_hash": meta["settings_hash"], "cached": cached, "meta": meta}


# ----------------------------------------------------------------------------------------------
# the build
# ----------------------------------------------------------------------------------------------
def build_pair(out_dir: str | os.PathLike, settings: ZooSettings = ZooSettings(), progress: Optional[Progress] = print,
               force: bool = False) -> dict:
    """Train the LN model and its LN-free twin into ``out_dir/ln`` and ``out_dir/noln`` (HF checkpoints).

    Returns ``{"ln", "noln", "zoo_json": paths, "ln_heldout_loss", "noln_heldout_loss": nats/token,
    "settings_hash", "cached": bool, "meta": contents of zoo.json}``. When ``out_dir/zoo.json`` has the
    same settings hash and both checkpoints are intact, nothing is rebuilt (``cached`` is True) unless
    ``force``. Checkpoints are built in a temporary folder and renamed into place; ``zoo.json`` is
    written last, so an interrupted build never looks complete.
    """
    settings.validate()
    say: Progress = progress if progress is not None else (lambda msg: None)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not force:
        meta = read_cache(out_dir, settings)
        if meta is not None:
            say(f"zoo: reusing the cached pair in {out_dir} (settings hash {meta['settings_hash']})")
            return _result(out_dir, meta, cached=True)
    _remove_stale_builds(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=out_dir))
    old_threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        with _quiet_transformers():
            meta = _build_into(tmp, settings, say)
        # swap in: invalidate the old record first, then move checkpoints, then write the record
        (out_dir / "zoo.json").unlink(missing_ok=True)
        for name in ("ln", "noln", "control", "train"):
            if not (tmp / name).exists():
                if (out_dir / name).exists():
                    os.replace(out_dir / name, tmp / f"old-{name}")
                continue
            if (out_dir / name).exists():
                os.replace(out_dir / name, tmp / f"old-{name}")
            os.replace(tmp / name, out_dir / name)
        atomic_write_json(out_dir / "zoo.json", meta)
    finally:
        torch.set_num_threads(old_threads)
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"zoo: wrote {out_dir / 'ln'} and {out_dir / 'noln'} in {meta['seconds']['total']:.0f} s")
    return _result(out_dir, meta, cached=False)


def recipe(settings: ZooSettings) -> dict:
    """The twin's and the control's schedule in words and numbers (recorded in zoo.json)."""
    n_sites = 2 * settings.n_layer + 1
    return {
        "order": "h.i.ln_2 for every layer, then h.i.ln_1, then ln_f",
        "sigma": ("measured per site once, on the LN model before any removal" if settings.sigma_before_removal
                  else "measured per site just before its freeze, earlier sites frozen"),
        "sigma_batches": settings.sigma_batches,
        "special_sigma": ("position 0 and BOS/EOS tokens get their own sigma, phased out linearly over the "
                          "recovery steps" if settings.special_sigma else None),
        "steps_per_site": settings.ln_removal_steps_per_site, "lr": settings.ln_removal_lr,
        "recovery_steps": settings.recovery_steps, "recovery_lr": "cosine from lr to lr/10",
        "fine_tuning_steps": n_sites * settings.ln_removal_steps_per_site + settings.recovery_steps,
        "control": ("the LN model fine-tuned on the same batches, steps and learning rates with LayerNorm kept"
                    if settings.control else None),
    }


def trace_point(model: nn.Module, held: torch.Tensor, site: str, k: int) -> dict:
    """Held-out loss, the resid_post growth fit (``normgrowth.fit.fit_growth`` of the per-sequence curves,
    default window, 200 bootstrap resamples over sequences) and the mean position-0 resid_post norm per block
    of ``model`` after site ``k`` (one :func:`.train.evaluate` pass, :func:`trace_entry`)."""
    return trace_entry(evaluate(model, held), site, k)


def trace_entry(ev: dict, site: str, k: int) -> dict:
    """The removal-trace entry of site ``k`` from an :func:`.train.evaluate` result (or
    :func:`.train.evaluation_rows` of one). A non-finite loss or norm raises, naming the site."""
    from ..fit import fit_growth

    if not math.isfinite(ev["loss"]):
        raise NormgrowthError(f"the held-out loss became {ev['loss']} after site {k} ({site}): the fine-tuning "
                              "diverged; lower the learning rate or add steps per site.")
    seq = ev["seq_norms"]
    bad = ~np.isfinite(seq).all(axis=0)
    if bad.any():
        raise NormgrowthError(f"the resid_post norm became non-finite at block {int(np.argmax(bad))} after site {k} "
                              f"({site}): the fine-tuning diverged; lower the learning rate or add steps per site.")
    fit = fit_growth(seq, n_boot=200, seed=0).to_json() if seq.shape[1] >= 2 else None
    return {"index": k, "site": site, "heldout_loss": ev["loss"], "fit": fit,
            "resid_post_norm": [round(float(v), 5) for v in seq.mean(axis=0)],
            "pos0_norm": [round(float(v), 5) for v in ev["pos0_norms"]]}


def _build_into(tmp: Path, settings: ZooSettings, say: Progress) -> dict:
    """Corpus, tokenizer, LN model, LN removal; checkpoints into ``tmp/ln`` and ``tmp/noln``; returns
    the record written as ``zoo.json``."""
    from transformers import GPT2LMHeadModel

    t_start, cpu_start = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        seconds[name] = round(time.perf_counter() - t0, 2)
        return time.perf_counter()

    t = time.perf_counter()
    docs, n_files = stdlib_docstrings(settings.max_chars, settings.min_doc_chars)
    train_docs, held_docs = split_docs(docs, settings.heldout_fraction)
    corpus_sha = corpus_sha256(docs)
    say(f"zoo: {len(docs)} docstrings from {n_files} stdlib files ({sum(map(len, docs)) / 1e6:.2f} M chars), "
        f"{len(held_docs)} held out")
    t = lap("corpus", t)

    tokenizer = train_tokenizer(train_docs, settings.vocab_size)
    bos_id = tokenizer.bos_token_id
    vocab_size = len(tokenizer)
    train_ids = tokenizer(train_docs, add_special_tokens=False)["input_ids"]
    held_ids = tokenizer(held_docs, add_special_tokens=False)["input_ids"]
    train_data = pack_sequences(train_ids, bos_id, settings.n_ctx)
    held_data = pack_sequences(held_ids, bos_id, settings.n_ctx)[: settings.max_heldout_seqs]
    if train_data.shape[0] < settings.batch_size or held_data.shape[0] == 0:
        raise NormgrowthError(
            f"the docstring corpus gives {train_data.shape[0]} training and {held_data.shape[0]} held-out "
            f"sequences of {settings.n_ctx} tokens, too few for batch_size={settings.batch_size}: raise "
            "max_chars or lower n_ctx/batch_size.")
    say(f"zoo: tokenizer vocab {vocab_size}; {train_data.shape[0]} training and {held_data.shape[0]} "
        f"held-out sequences of {settings.n_ctx} tokens")
    t = lap("tokenizer", t)

    torch.manual_seed(settings.seed)
    config = make_config(settings, bos_id, vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config)
    batches = batch_stream(train_data, settings.batch_size, settings.seed)
    opt = make_optimizer(model, settings.lr, settings.weight_decay)
    steps = checkpoint_steps(settings.train_steps, settings.train_checkpoints)
    shas: dict[str, str] = {}

    def save_step(n: int) -> None:
        if n in steps:
            shas[f"train/step-{n}"] = _save_checkpoint(model, tokenizer, tmp / "train" / f"step-{n}")

    save_step(0)
    train_steps(model, opt, batches, settings.train_steps,
                lambda s: cosine_lr(s, settings.train_steps, settings.lr, settings.warmup_steps),
                say, "LN model", math.ceil(settings.train_steps / 7), on_step=save_step)
    ln_loss = heldout_loss(model, held_data)
    ln_norms = resid_post_norms(model, held_data)
    say(f"zoo: LN model held-out loss {ln_loss:.4f}")
    ln_sha = _save_checkpoint(model, tokenizer, tmp / "ln")
    ln_state = copy.deepcopy(model.state_dict())
    t = lap("train_ln", t)

    start = trace_point(model, held_data, "LN model", -1)
    trace: dict[str, list[dict]] = {"twin": [start], "control": [start]}

    def tracer(name: str):
        return lambda k, site, m: trace[name].append(trace_point(m, held_data, site, k))

    sigmas_full = {}
    sigmas = remove_layernorm(model, batches, settings, say, special_id=bos_id, on_site=tracer("twin"),
                              sigmas_out=sigmas_full)
    frozen_loss = heldout_loss(model, held_data)
    stored = to_ln_free_storage(model)
    noln_loss = heldout_loss(stored, held_data)
    if not abs(noln_loss - frozen_loss) <= 1e-4 * max(1.0, abs(frozen_loss)):
        raise RuntimeError(f"stored LN-free model loss {noln_loss} differs from the frozen-LN model's {frozen_loss}")
    noln_norms = resid_post_norms(stored, held_data)
    say(f"zoo: LN-free model held-out loss {noln_loss:.4f} (LN model {ln_loss:.4f})")
    noln_sha = _save_checkpoint(stored, tokenizer, tmp / "noln")
    trace["twin"].append(trace_point(stored, held_data, "recovery", len(ln_sites(settings.n_layer))))
    t = lap("remove_ln", t)

    control_loss, control_norms = None, None
    if settings.control:
        # the LN model again, on exactly the twin's batches, steps and learning rates, LayerNorm kept
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            control = GPT2LMHeadModel(config)
        control.load_state_dict(ln_state)
        control_batches = batch_stream(train_data, settings.batch_size, settings.seed)
        for _ in range(settings.train_steps):
            next(control_batches)
        remove_layernorm(control, control_batches, settings, say, special_id=bos_id, keep_ln=True,
                         on_site=tracer("control"))
        control_loss = heldout_loss(control, held_data)
        control_norms = resid_post_norms(control, held_data)
        trace["control"].append(trace_point(control, held_data, "recovery", len(ln_sites(settings.n_layer))))
        say(f"zoo: control (LN kept, same schedule) held-out loss {control_loss:.4f}")
        shas["control"] = _save_checkpoint(control, tokenizer, tmp / "control")
        t = lap("control", t)
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    seconds["cpu_total"] = round(time.process_time() - cpu_start, 2)  # CPU time of all threads

    return {
        "settings": dataclasses.asdict(settings), "settings_hash": settings_hash(settings),
        "format_version": ZOO_FORMAT_VERSION, "python": python_version(),
        "corpus": {"n_files": n_files, "n_docs": len(docs), "n_train_docs": len(train_docs),
                   "n_heldout_docs": len(held_docs), "n_chars": sum(map(len, docs)), "sha256": corpus_sha,
                   "n_train_seqs": int(train_data.shape[0]), "n_heldout_seqs": int(held_data.shape[0]),
                   "train_tokens": int(train_data.numel())},
        "vocab_size": vocab_size, "bos_token_id": bos_id,
        "ln_heldout_loss": ln_loss, "noln_heldout_loss": noln_loss, "frozen_ln_heldout_loss": frozen_loss,
        "control_heldout_loss": control_loss,
        "recipe": recipe(settings),
        "sigma_avg": sigmas, "sigma_special": {k: v[1] for k, v in sigmas_full.items()} if settings.special_sigma
        else None,
        "resid_post_norm": {name: [round(float(v), 5) for v in norms] for name, norms in
                            (("ln", ln_norms), ("noln", noln_norms), ("control", control_norms)) if norms is not None},
        "growth_per_layer": {name: growth_per_layer(norms) for name, norms in
                             (("ln", ln_norms), ("noln", noln_norms), ("control", control_norms)) if norms is not None},
        "train_checkpoint_steps": steps,
        "ln_removal_trace": trace,
        "weights_sha256": {"ln": ln_sha, "noln": noln_sha, **shas},
        "threads": torch.get_num_threads(), "seconds": seconds,
    }


# ----------------------------------------------------------------------------------------------
# several seeds
# ----------------------------------------------------------------------------------------------
def seed_summary(metas: list[dict]) -> dict:
    """Across seeds: each seed's resid_post growth factor per layer (the final fits of the removal trace:
    default window, bootstrap over held-out sequences) of the LN model, the twin and the control, the
    twin-minus-control difference ``d_s``, and its mean with the t interval
    ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)`` (None for one seed)."""
    from ..numerics import t_interval

    rows = []
    for meta in metas:
        trace = meta.get("ln_removal_trace") or {}
        g = {"ln": trace["twin"][0]["fit"]["growth_factor"], "noln": trace["twin"][-1]["fit"]["growth_factor"],
             "control": trace["control"][-1]["fit"]["growth_factor"] if len(trace.get("control", [])) > 1 else None}
        rows.append({"seed": meta["settings"]["seed"], "growth_factor": g,
                     "heldout_loss": {"ln": meta["ln_heldout_loss"], "noln": meta["noln_heldout_loss"],
                                      "control": meta.get("control_heldout_loss")},
                     "twin_minus_control": None if g["control"] is None else g["noln"] - g["control"]})
    diffs = np.array([r["twin_minus_control"] for r in rows if r["twin_minus_control"] is not None], dtype=float)
    n = diffs.size
    out: dict[str, Any] = {"seeds": rows, "n_seeds": len(rows), "twin_minus_control_mean": None,
                           "twin_minus_control_sd": None, "twin_minus_control_ci95": None}
    if n:
        out["twin_minus_control_mean"] = float(diffs.mean())
    if n >= 2:
        sd = float(diffs.std(ddof=1))
        out["twin_minus_control_sd"] = sd
        out["twin_minus_control_ci95"] = list(t_interval(float(diffs.mean()), sd / math.sqrt(n), n - 1))
    return out


def build_seeds(out_dir: str | os.PathLike, settings: ZooSettings = ZooSettings(), n_seeds: int = 1,
                progress: Optional[Progress] = print, force: bool = False) -> list[dict]:
    """:func:`build_pair` for seeds ``settings.seed + k``, k = 0 .. n_seeds - 1: the first into ``out_dir``,
    the others into ``out_dir/seeds/seed-<s>``; writes :func:`seed_summary` to ``out_dir/seeds.json``."""
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise NormgrowthError(f"the number of seeds must be a positive integer, got {n_seeds!r}.")
    out_dir = Path(out_dir).expanduser()
    results = []
    for k in range(n_seeds):
        s = dataclasses.replace(settings, seed=settings.seed + k)
        target = out_dir if k == 0 else out_dir / "seeds" / f"seed-{s.seed}"
        results.append(build_pair(target, s, progress=progress, force=force))
    atomic_write_json(out_dir / "seeds.json", seed_summary([r["meta"] for r in results]))
    return results
