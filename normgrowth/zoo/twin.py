"""A norm-free twin of a trained pre-norm model and its same-schedule control (``normgrowth zoo twin``).

:func:`build_twin` loads a model (a local HF folder, a ``.gguf`` file or ``smollm2-135m``:
:func:`load_source`), tokenises the stdlib docstrings and ``pydoc_data.topics`` with the model's own
tokenizer (held-out split by text hash), then :func:`run_twin`: every norm removed one at a time
(:func:`.ln_removal.remove_layernorm`, RMSNorm or LayerNorm), the result stored in the LN-free format, and
a copy of the same model fine-tuned on exactly the same batches, steps and learning rates with its norms
kept (the control). Writes ``twin/``, ``control/`` (HF checkpoints with the tokenizer), ``heldout.npy``
and ``twin.json`` (schedule, losses, scales, removal trace). Recipe, schedules and timings: docs/zoo.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import NormgrowthError
from ..storage import atomic_write_json
from .build import _quiet_transformers, _remove_stale_builds, _save_checkpoint, trace_entry, trace_point
from .corpus import batch_stream, corpus_sha256, pack_sequences, pydoc_topics, split_docs, stdlib_docstrings
from .layout import blocks_of
from .ln_removal import ScheduleLog, first_runaway, norm_sites, remove_layernorm, to_ln_free_storage
from .settings import RemovalSchedule, python_version
from .train import Progress, evaluate, evaluation_rows, growth_per_layer

TWIN_FORMAT_VERSION = 3
HELDOUT_FILE = "heldout.npy"  # the held-out rows [n, n_ctx] (int64), the analyses' --data
FAILED_FILE = "twin-failed.json"  # the record of a build whose norm-free recovery diverged (no twin stored)


@dataclass(frozen=True)
class TwinSettings:
    """Everything that determines a twin and its control besides the source model (recorded in twin.json).

    The default is the **reduced** CPU schedule (:meth:`reduced`); :meth:`full` is the GPU schedule."""

    n_ctx: int = 128  # tokens per training / held-out row (separator token first)
    batch_size: int = 4
    steps_per_norm: int = 2  # AdamW steps after each frozen norm, constant lr
    recovery_steps: int = 100  # after the last norm: cosine lr -> lr/10, position-0 scale phased out
    lr: float = 1e-4
    weight_decay: float = 0.0  # fine-tuning of a trained model: no decay
    sigma_batches: int = 4  # training batches on which every norm's scales are measured (before any removal)
    special_sigma: bool = True  # position 0 and separator tokens keep their own scale until the recovery
    outlier_ratio: Optional[float] = 4.0  # so do tokens whose scale exceeds this multiple of sigma_avg
    scale_penalty: float = 10.0  # weight of the scale penalty (ln_removal.ScalePenalty) in twin and control
    scale_margin: float = 1.5  # the penalty counts norm inputs above this multiple of their sigma_avg
    special_scale_margin: float = 1.0  # at position 0 and separators: every token must come down to sigma_avg
    phase_window: float = 4.0  # recovery phases the special scale out over this many blocks at a time, bottom-up (0: all at once)
    max_skipped_fraction: float = 0.5  # share of recovery steps whose non-finite loss is skipped (no update) before failing
    min_finite_rows: float = 0.75  # share of held-out rows on which the finished twin must be finite to be kept
    heldout_fraction: float = 0.05  # share of texts held out (by a hash of the text)
    max_heldout_seqs: int = 32  # held-out rows for the final losses and norms
    trace_seqs: int = 8  # held-out rows evaluated after every norm (the removal trace)
    seed: int = 0  # data order
    threads: Optional[int] = 2  # torch threads on CPU (None: leave torch's setting)
    device: str = "cpu"

    @classmethod
    def reduced(cls, **overrides: Any) -> "TwinSettings":
        """The 2-CPU-core schedule: 4 x 128 tokens per step, 2 steps per norm, 100 recovery steps."""
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides: Any) -> "TwinSettings":
        """The GPU schedule: 8 x 256 tokens per step, 10 steps per norm, 300 recovery steps, 128 held-out
        rows (all traced)."""
        base = dict(n_ctx=256, batch_size=8, steps_per_norm=10, recovery_steps=300, sigma_batches=16,
                    max_heldout_seqs=128, trace_seqs=64, threads=None, device="cuda")
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "TwinSettings":
        """Seconds on a tiny model, for tests."""
        base = dict(n_ctx=16, batch_size=2, steps_per_norm=1, recovery_steps=2, sigma_batches=1,
                    max_heldout_seqs=4, trace_seqs=4, threads=1, lr=1e-3)
        return cls(**{**base, **overrides})

    @property
    def removal(self) -> RemovalSchedule:
        """The removal schedule shared by twin and control."""
        return RemovalSchedule(self.steps_per_norm, self.lr, self.weight_decay, self.recovery_steps,
                               self.sigma_batches, True, self.special_sigma, "live", self.outlier_ratio,
                               self.scale_penalty, self.scale_margin, self.special_scale_margin,
                               self.phase_window or None, int(self.max_skipped_fraction * self.recovery_steps))

    def validate(self) -> None:
        """Raise :class:`NormgrowthError` for settings that cannot build a twin."""
        if self.n_ctx < 2 or self.batch_size < 1 or self.sigma_batches < 1 or self.trace_seqs < 1:
            raise NormgrowthError("twin settings need n_ctx >= 2 and batch_size, sigma_batches, trace_seqs >= 1.")
        if self.steps_per_norm < 0 or self.recovery_steps < 0:
            raise NormgrowthError("twin settings: --steps-per-norm and --recovery-steps must be >= 0.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise NormgrowthError(f"twin settings: the learning rate must be a positive number, got {self.lr}.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise NormgrowthError("twin settings: heldout_fraction must lie strictly between 0 and 1.")
        if not (self.scale_penalty >= 0 and math.isfinite(self.scale_penalty)):
            raise NormgrowthError(f"twin settings: --scale-penalty must be a number >= 0, got {self.scale_penalty}.")
        for name in ("max_skipped_fraction", "min_finite_rows"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise NormgrowthError(f"twin settings: {name} must lie between 0 and 1, got {value}.")
        if not (self.phase_window >= 0 and math.isfinite(self.phase_window)):
            raise NormgrowthError(f"twin settings: --phase-window must be a number of blocks >= 0 (0: every norm at "
                                  f"once), got {self.phase_window}.")
        for name in ("scale_margin", "special_scale_margin"):
            value = getattr(self, name)
            if not (value >= 1 and math.isfinite(value)):
                raise NormgrowthError(f"twin settings: {name} must be a number >= 1, got {value}.")


# ----------------------------------------------------------------------------------------------
# model source
# ----------------------------------------------------------------------------------------------
def load_source(spec: str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` in float32 from a local HF folder, a ``.gguf`` file or a named model such as
    ``smollm2-135m``, resolved as every command resolves a model (:mod:`normgrowth.sources`; a GGUF file is
    read through its dequantised float32 copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..sources import NAMED_MODELS, dequantised_folder, resolve_source

    source = resolve_source(spec)
    if source.format == "gguf":
        path, _ = dequantised_folder(source.path)
    elif source.path is not None:
        path = source.path
    else:
        raise NormgrowthError(f"model {spec!r} is neither a local folder, a .gguf file nor a named model "
                              f"({', '.join(NAMED_MODELS)}): give a Hugging Face checkpoint folder or a .gguf file.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def separator_id(tokenizer: Any) -> int:
    """The token that starts every row and separates texts: the tokenizer's BOS, else its EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise NormgrowthError("the model's tokenizer has neither a BOS nor an EOS token to separate texts with.")


# ----------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------
def twin_texts() -> tuple[list[str], dict]:
    """The stdlib docstrings (:func:`.corpus.stdlib_docstrings`) followed by the ``pydoc_data.topics``
    texts (:func:`.corpus.pydoc_topics`), exact duplicates dropped; and their statistics."""
    docs, n_files = stdlib_docstrings()
    topics = pydoc_topics()
    seen = set(docs)
    texts = docs + [t for t in topics if t not in seen]
    return texts, {"n_files": n_files, "n_docstrings": len(docs), "n_topics": len(texts) - len(docs),
                   "n_chars": sum(map(len, texts)), "sha256": corpus_sha256(texts)}


def tokenised_rows(tokenizer: Any, texts: list[str], n_ctx: int, heldout_fraction: float,
                   max_heldout: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(train, held-out)`` rows ``[n, n_ctx]`` (:func:`.corpus.pack_sequences` with the separator of
    :func:`separator_id`; held out by :func:`.corpus.is_heldout`; at most ``max_heldout`` held-out rows)."""
    sep = separator_id(tokenizer)
    train_texts, held_texts = split_docs(texts, heldout_fraction)
    ids = lambda batch: tokenizer(batch, add_special_tokens=False)["input_ids"]  # noqa: E731
    train = pack_sequences(ids(train_texts), sep, n_ctx)
    held = pack_sequences(ids(held_texts), sep, n_ctx)[:max_heldout]
    stats = {"n_train_texts": len(train_texts), "n_heldout_texts": len(held_texts),
             "n_train_rows": int(train.shape[0]), "n_heldout_rows": int(held.shape[0]),
             "train_tokens": int(train.numel()), "separator_id": sep}
    return train, held, stats


# ----------------------------------------------------------------------------------------------
# twin and control
# ----------------------------------------------------------------------------------------------
def _summary(ev: dict) -> dict:
    """Held-out loss (mean over every predicted token; per row, and the median row), mean resid_post norm
    per block (positions >= 1), position-0 norm per block and the point estimate ``growth_per_layer`` (all
    blocks) from an :func:`.train.evaluate` result on the held-out rows (or :func:`.train.evaluation_rows`)."""
    norms = ev["seq_norms"].mean(axis=0)
    return {"heldout_loss": ev["loss"], "heldout_loss_per_row": [round(float(v), 5) for v in ev["seq_loss"]],
            "heldout_loss_median_row": float(np.median(ev["seq_loss"])),
            "resid_post_norm": [round(float(v), 5) for v in norms],
            "pos0_norm": [round(float(v), 5) for v in ev["pos0_norms"]],
            "growth_per_layer": growth_per_layer(norms)}


def run_twin(model: nn.Module, train: torch.Tensor, held: torch.Tensor, settings: TwinSettings,
             special_id: Optional[int], progress: Optional[Progress] = None) -> dict:
    """Remove every norm of ``model`` (in place) and fine-tune a copy with its norms kept on the same schedule.

    Returns ``{"frozen": model with frozen norms, "twin": its LN-free storage (:func:`to_ln_free_storage`) or
    None, "control": the copy, "record": dict}``; ``record`` holds the sites, scales, both runs' logged
    schedules (:class:`ScheduleLog`), the removal trace on the first ``trace_seqs`` held-out rows, the
    recovery's training loss per step, the scale penalty of every step of both runs, and the held-out
    summaries of the base model, of twin and control after the last norm's steps (``after_freezing``: the
    twin still divides position 0, separators and outlier tokens by their own scale) and of the finished
    twin and control.

    The twin's recovery skips up to ``max_skipped_fraction`` of its steps whose loss is not finite (no update),
    and the control makes no update at the same steps (``recovery_skipped_steps``). The finished twin is then
    evaluated on every held-out row; rows on which it is not finite are left out of every later summary of
    twin and control alike (``heldout_rows``: the kept rows, and for each left-out row where its residual ran
    away, :func:`.ln_removal.first_runaway`; ``control_all_rows``: the control on every row), and
    ``heldout_kept`` (returned) holds the kept rows.

    When the twin's fine-tuning diverges during the recovery (more non-finite steps than may be skipped) or
    the finished twin is finite on fewer than ``min_finite_rows`` of the held-out rows, ``twin`` is None,
    ``record["diverged"]`` says where and why, and the control runs the same schedule up to the recovery
    only. Raises when the schedules differ or when the stored twin's loss differs from the frozen model's by
    more than 1e-4 (relative)."""
    from ..errors import TrainingDiverged

    say = progress if progress is not None else (lambda msg: None)
    device = next(model.parameters()).device
    train, held = train.to(device), held.to(device)
    schedule = settings.removal
    sites = norm_sites(model)
    control = copy.deepcopy(model)
    first_rows = slice(0, settings.trace_seqs)  # the traced rows: the first held-out rows
    traced = held[first_rows]
    base_eval = evaluate(model, held)
    base = _summary(base_eval)
    start = trace_entry(evaluation_rows(base_eval, first_rows), "base model", -1)
    trace: dict[str, list[dict]] = {"twin": [start], "control": [start]}
    after_freezing: dict[str, dict] = {}
    last_site_eval: dict[str, dict] = {}  # each run on every held-out row after its last norm's steps
    say(f"zoo twin: base model held-out loss {base['heldout_loss']:.4f}; {len(sites)} norms, "
        f"{schedule.fine_tuning_steps(len(sites))} fine-tuning steps per run")

    def tracer(name: str):
        def on_site(k: int, site: str, m: nn.Module) -> None:
            if k < len(sites) - 1:
                trace[name].append(trace_point(m, traced, site, k))
                return
            ev = last_site_eval[name] = evaluate(m, held)
            trace[name].append(trace_entry(evaluation_rows(ev, first_rows), site, k))
            after_freezing[name] = _summary(ev)
        return on_site

    t0 = time.perf_counter()
    twin_log, control_log = ScheduleLog(), ScheduleLog()
    sigmas: dict = {}
    recovery: list = []
    penalties: dict[str, list] = {"twin": [], "control": []}
    skipped: dict[str, list] = {"twin": [], "control": []}
    diverged = None
    try:
        remove_layernorm(model, batch_stream(train, settings.batch_size, settings.seed), schedule, say,
                         special_id=special_id, on_site=tracer("twin"), sigmas_out=sigmas, log=twin_log,
                         recovery_trace=recovery, penalty_trace=penalties["twin"], skipped_out=skipped["twin"])
    except TrainingDiverged as err:
        if err.label != "norm-free recovery":
            raise
        diverged = {"step": err.step, "of": err.n_steps, "phase": err.step / err.n_steps, "loss": err.loss,
                    "reason": f"non-finite training loss after {len(skipped['twin'])} skipped steps"}
        say(f"zoo twin: the norm-free recovery diverged at step {err.step} of {err.n_steps} (recovery fraction "
            f"{diverged['phase']:.2f}, {len(skipped['twin'])} non-finite steps skipped before); no norm-free twin "
            "on this schedule")
    twin = stored = frozen_loss = None
    kept = np.arange(held.shape[0])
    excluded: list[dict] = []
    if diverged is None:
        frozen_eval = evaluate(model, held)
        finite = np.isfinite(frozen_eval["seq_loss"])
        kept = np.flatnonzero(finite)
        for row in np.flatnonzero(~finite):
            excluded.append({"row": int(row), **(first_runaway(model, held[row]) or {})})
        say(f"zoo twin: the norm-free model is finite on {kept.size} of {held.shape[0]} held-out rows")
        if kept.size < max(1, math.ceil(settings.min_finite_rows * held.shape[0])):
            n = schedule.recovery_steps
            diverged = {"step": n, "of": n, "phase": 1.0, "loss": float("nan"),
                        "reason": f"the finished model is finite on {kept.size} of {held.shape[0]} held-out rows "
                                  f"(needs {settings.min_finite_rows:g} of them)"}
    held_kept = held[torch.as_tensor(kept, device=held.device)]
    if diverged is None:
        frozen_loss = evaluation_rows(frozen_eval, kept)["loss"]
        stored = to_ln_free_storage(model).to(device)
        stored_eval = evaluate(stored, held_kept)
        twin = _summary(stored_eval)
        if not abs(twin["heldout_loss"] - frozen_loss) <= 1e-4 * max(1.0, abs(frozen_loss)):
            raise RuntimeError(f"stored LN-free model loss {twin['heldout_loss']} differs from the frozen model's "
                               f"{frozen_loss}")
        trace["twin"].append(trace_entry(evaluation_rows(stored_eval, first_rows), "recovery", len(sites)))
    t_twin = time.perf_counter() - t0
    if twin is not None:
        say(f"zoo twin: norm-free twin held-out loss {twin['heldout_loss']:.4f} on its {kept.size} finite rows "
            f"({t_twin:.0f} s)")

    t0 = time.perf_counter()
    control_schedule_run = schedule if diverged is None else dataclasses.replace(schedule, recovery_steps=0)
    remove_layernorm(control, batch_stream(train, settings.batch_size, settings.seed), control_schedule_run, say,
                     special_id=special_id, keep_ln=True, on_site=tracer("control"), log=control_log,
                     penalty_trace=penalties["control"], skipped_out=skipped["control"],
                     skip_steps=set(skipped["twin"]))
    # without recovery steps the control is where its last norm's steps left it: that evaluation is this one
    ctrl_eval = last_site_eval["control"] if control_schedule_run.recovery_steps == 0 else evaluate(control, held)
    ctrl_all = _summary(ctrl_eval)
    ctrl_kept_eval = evaluation_rows(ctrl_eval, kept)
    ctrl = ctrl_all if kept.size == held.shape[0] else _summary(ctrl_kept_eval)
    if diverged is None:
        trace["control"].append(trace_entry(evaluation_rows(ctrl_kept_eval, first_rows), "recovery", len(sites)))
    t_control = time.perf_counter() - t0
    say(f"zoo twin: control (norms kept, same schedule) held-out loss {ctrl['heldout_loss']:.4f} "
        f"({t_control:.0f} s)")
    twin_schedule, control_schedule = twin_log.to_json(), control_log.to_json()
    if diverged is not None:  # compare the steps both ran: everything before the twin's recovery
        twin_schedule = _before_recovery(twin_schedule)
        skipped["twin"] = []
    if twin_schedule != control_schedule or skipped["twin"] != skipped["control"]:
        raise RuntimeError("the control's batches, learning rates or skipped steps differ from the twin's")
    record = {
        "sites": sites, "n_layer": len(blocks_of(model)), "twin_built": diverged is None, "diverged": diverged,
        "sigma_avg": {k: v[0] for k, v in sigmas.items()}, "sigma_special": {k: v[1] for k, v in sigmas.items()},
        "schedule": {"twin": twin_schedule, "control": control_schedule, "equal": True,
                     "compared": "every step" if diverged is None else "the steps before the recovery"},
        "fine_tuning_steps": schedule.fine_tuning_steps(len(sites)),
        "recovery_skipped_steps": skipped["twin"],
        "heldout_rows": {"n": int(held.shape[0]), "kept": [int(i) for i in kept], "excluded": excluded},
        "frozen_heldout_loss": frozen_loss,
        "base": base, "after_freezing": after_freezing, "twin": twin, "control": ctrl,
        "control_all_rows": ctrl_all,
        "twin_minus_control_loss": None if twin is None else twin["heldout_loss"] - ctrl["heldout_loss"],
        "after_freezing_twin_minus_control_loss":
            after_freezing["twin"]["heldout_loss"] - after_freezing["control"]["heldout_loss"],
        "recovery_trace": recovery,
        "scale_penalty_trace": penalties,
        "ln_removal_trace": trace,
        "seconds": {"twin": round(t_twin, 2), "control": round(t_control, 2)},
    }
    return {"frozen": model, "twin": stored, "control": control, "record": record, "heldout_kept": held_kept}


def _before_recovery(schedule_log: dict) -> dict:
    """A :meth:`ScheduleLog.to_json` document cut before its first recovery batch and learning rate."""
    log = ScheduleLog()
    log.batches = [b for b in schedule_log["batches"] if b[0] != "recovery"]
    log.lrs = [lr for lr in schedule_log["lrs"] if lr[0] != "recovery"]
    return log.to_json()


def recipe_text(settings: TwinSettings, n_sites: int) -> dict:
    """The schedule in words and numbers (recorded in twin.json)."""
    return {
        "order": "every block's MLP input norm, then every attention input norm, then the final norm",
        "sigma": f"measured for every norm once, on {settings.sigma_batches} training batches of the model "
                 "before any removal; position 0 and separator tokens apart",
        "special_scale": ("position 0, separator tokens and every token whose scale exceeds "
                          f"{settings.outlier_ratio} x sigma_avg keep their own scale s until the recovery, which "
                          "phases it out geometrically: s^(1 - phase) sigma_avg^phase, "
                          + (f"block by block from the embedding up, about {settings.phase_window:g} blocks in "
                             "transition at a time (phase = clip((f (L + W) - b) / W, 0, 1) for block b of the "
                             f"L = n_layer + 1 blocks counting the final norm, W = {settings.phase_window:g}, f = "
                             "step / recovery steps)" if settings.phase_window else
                             "every norm together (phase = step / recovery steps)"))
        if settings.special_sigma else None,
        "steps_per_norm": settings.steps_per_norm, "lr": settings.lr, "recovery_steps": settings.recovery_steps,
        "recovery_lr": "cosine from lr to lr/10",
        "non_finite_steps": (f"up to {settings.removal.recovery_max_skipped} recovery steps "
                             "whose loss is inf or NaN make no update (the control makes none at the same steps); "
                             "one more fails the build"),
        "heldout_rows": ("held-out rows on which the finished twin is not finite are left out of the summaries of "
                         f"twin and control alike; fewer than {settings.min_finite_rows:g} of the rows left fails "
                         "the build"),
        "scale_penalty": (f"every step of twin and control adds {settings.scale_penalty} x the scale penalty: the "
                          "mean over norms of the per-row sum over tokens of relu(ln(s / sigma_avg) - "
                          f"ln {settings.scale_margin})^2, s the token's scale at the norm's input")
        if settings.scale_penalty > 0 else None,
        "tokens_per_step": settings.batch_size * settings.n_ctx,
        "fine_tuning_steps": n_sites * settings.steps_per_norm + settings.recovery_steps,
        "control": "the same model fine-tuned on the same batches, steps and learning rates with its norms kept",
    }


def build_twin(source: str, out_dir: str | os.PathLike, settings: TwinSettings = TwinSettings(),
               progress: Optional[Progress] = print) -> dict:
    """Load ``source`` (:func:`load_source`), build its norm-free twin and the control (:func:`run_twin`) and
    write ``out_dir/twin``, ``out_dir/control``, ``out_dir/heldout.npy`` (the held-out rows, for the
    analyses' ``--data``) and ``out_dir/twin.json`` (written last; the rest is built in a temporary folder and
    renamed into place). Returns the record written as twin.json."""
    settings.validate()
    say: Progress = progress if progress is not None else (lambda msg: None)
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise NormgrowthError(f"device {settings.device!r} was asked for but no GPU is visible: use --device cpu.")
    out_dir = Path(out_dir).expanduser()
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        with _quiet_transformers():
            model, tokenizer = load_source(source)
            model = model.to(settings.device)
            t_load = time.perf_counter() - t_start
            say(f"zoo twin: loaded {source} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                f"{t_load:.0f} s)")
            texts, corpus = twin_texts()
            train, held, rows = tokenised_rows(tokenizer, texts, settings.n_ctx, settings.heldout_fraction,
                                               settings.max_heldout_seqs)
            if train.shape[0] < settings.batch_size or held.shape[0] == 0:
                raise NormgrowthError(f"the text gives {train.shape[0]} training and {held.shape[0]} held-out rows "
                                      f"of {settings.n_ctx} tokens: lower --n-ctx or the batch size.")
            say(f"zoo twin: {len(texts)} texts, {rows['n_train_rows']} training and {rows['n_heldout_rows']} "
                f"held-out rows of {settings.n_ctx} tokens")
            out_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_builds(out_dir)
            tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-", dir=out_dir))
            try:
                result = run_twin(model, train, held, settings, rows["separator_id"], say)
                record = {"source": source, "model_type": model.config.model_type,
                          "settings": dataclasses.asdict(settings), "format_version": TWIN_FORMAT_VERSION,
                          "python": python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "corpus": {**corpus, **rows}, "recipe": recipe_text(settings, len(result["record"]["sites"])),
                          **result["record"]}

                def write_record(name: str) -> None:
                    record["seconds"] = {**record["seconds"], "load": round(t_load, 2),
                                         "total": round(time.perf_counter() - t_start, 2)}
                    atomic_write_json(out_dir / name, record)

                if result["twin"] is None:
                    write_record(FAILED_FILE)
                    d = record["diverged"]
                    raise NormgrowthError(
                        f"the norm-free recovery failed at step {d['step']} of {d['of']} ({d['reason']}), so no "
                        f"twin was stored; {out_dir / FAILED_FILE} records the removal up to there and the control "
                        "after the same norm-freezing steps.")
                shas = {name: _save_checkpoint(result[name].cpu(), tokenizer, tmp / name)
                        for name in ("twin", "control")}
                np.save(tmp / HELDOUT_FILE, result["heldout_kept"].cpu().numpy().astype(np.int64))
                (out_dir / "twin.json").unlink(missing_ok=True)
                (out_dir / FAILED_FILE).unlink(missing_ok=True)
                for name in ("twin", "control", HELDOUT_FILE):
                    if (out_dir / name).exists():
                        os.replace(out_dir / name, tmp / f"old-{name}")
                    os.replace(tmp / name, out_dir / name)
                record["weights_sha256"] = shas
                write_record("twin.json")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        torch.set_num_threads(old_threads)
    say(f"zoo twin: wrote {out_dir / 'twin'}, {out_dir / 'control'} and {out_dir / 'twin.json'} in "
        f"{record['seconds']['total']:.0f} s")
    return record
