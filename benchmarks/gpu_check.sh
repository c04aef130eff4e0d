#!/usr/bin/env bash
# GPU check for issue 6 (performance). Runs on a fresh CUDA machine holding only a copy of this repo,
# from the repo root:   bash benchmarks/gpu_check.sh
# Writes into $OUT (default benchmarks/results/gpu-check): the benchmark JSON(s), gpu_check.log,
# pytest.log. Finishes in under 8 minutes: every step has its own time limit.
#
# Environment, in this order:
#   1. PyPI reachable: python3 -m venv .venv-gpu; pip install torch==2.13.0 (PyPI's default Linux wheel
#      is the CUDA build) and pip install -c constraints.txt -e .
#   2. offline (the lent H100/H200 machines reach nothing): a venv on top of the image's own python3
#      (CUDA PyTorch, numpy, scipy, matplotlib, typer, pytest are there) plus the wheels in .whl-gpu/
#      (transformer-lens 4.3.0, transformers 5.24.0, datasets and the few packages the image lacks),
#      which benchmarks/fetch_gpu_wheels.sh downloads on a machine with PyPI access. Carry .whl-gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/benchmarks/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
LOG="$OUT/gpu_check.log"
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( 470 - ($(date +%s) - START) )); }  # seconds left of the 8-minute budget (10 s margin)

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
VENV=.venv-gpu
PY=$VENV/bin/python
if timeout 8 python3 -c "import urllib.request as u; u.urlopen('https://pypi.org/simple/pip/', timeout=5)" 2>/dev/null; then
  log "PyPI reachable: fresh venv with torch==2.13.0 from PyPI"
  python3 -m venv "$VENV" >>"$LOG" 2>&1
  timeout 300 "$PY" -m pip install -q torch==2.13.0 >>"$LOG" 2>&1 || log "torch install FAILED"
  timeout 120 "$PY" -m pip install -q -c constraints.txt -e '.[test]' >>"$LOG" 2>&1 || log "project install FAILED"
else
  log "offline: venv over the image's python3 + carried wheels (.whl-gpu)"
  python3 -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1
  if ls .whl-gpu/*.whl >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile .whl-gpu/*.whl >>"$LOG" 2>&1 \
      || log "wheel install FAILED"
  else
    log "no .whl-gpu/*.whl: run benchmarks/fetch_gpu_wheels.sh where PyPI is reachable and carry .whl-gpu"
  fi
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
    || { log "editable install failed: using PYTHONPATH"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for pkg in ("transformers", "transformer-lens", "numpy"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "MISSING")
import normgrowth.models, normgrowth.collector  # noqa: F401  (fails loudly if the environment is incomplete)
print("normgrowth imports: ok")
EOF
log "environment ready"

BENCH="$PY benchmarks/bench.py --device cuda --out $OUT --cache-dir /tmp/normgrowth-bench"
budget() { local t=$(( $(left) - $1 )); [ "$t" -gt 240 ] && t=240; echo "$t"; }  # keep $1 s for later steps
# 1. the main comparison: GPT-2-small and Pythia-410m shapes, seq 128 and 1024, batch 8, float32
#    (bench.py writes its JSON with what it has if the time limit stops it)
timeout "$(budget 150)" $BENCH --models gpt2-small,pythia-410m --seq-lens 128,1024 --batch-size 8 \
  --reps 3 --rounds 1 --scaling-n-seqs 8 >"$OUT/bench_fp32.txt" 2>&1
log "fp32 benchmark exit $? (124: time limit):"; tail -45 "$OUT/bench_fp32.txt" >>"$LOG"
# 2. the test suite once with the GPU visible (CUDA_VISIBLE_DEVICES as the machine sets it)
T=$(( $(left) - 60 )); [ "$T" -gt 180 ] && T=180
if [ "$T" -gt 30 ]; then
  timeout "$T" "$PY" -m pytest tests -q -p no:cacheprovider >"$OUT/pytest.log" 2>&1
  rc=$?
  log "pytest exit $rc (124: stopped at the time limit): $(tail -1 "$OUT/pytest.log")"
else
  log "no time left for pytest"
fi
# 3. if time is left: bf16, the larger model at 1024 (norms are still accumulated in float32)
T=$(( $(left) - 5 ))
if [ "$T" -gt 40 ]; then
  timeout "$T" $BENCH --models pythia-410m --seq-lens 1024 --batch-size 8 --dtype bfloat16 \
    --configs a,a0,b,c,d,f --reps 3 --scaling-n-seqs 0 --tag bf16 >"$OUT/bench_bf16.txt" 2>&1
  log "bf16 benchmark exit $?"; tail -20 "$OUT/bench_bf16.txt" >>"$LOG"
fi
log "done; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
