#!/usr/bin/env bash
# One prepared GPU session: GPU tests, then the training / evaluation benchmarks at 800 px.
#
#   1. here, with PyPI access (once per checkout; .whl/ is git-ignored):
#        bash benchmarks/gpu_session.sh --fetch-wheels
#   2. on the lent GPU machine (the device tool), carrying the wheels:
#        run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=560)
#      or anywhere with a GPU and the package installed:
#        OUT=gpu_out bash benchmarks/gpu_session.sh
#
# Results (at most 8 files, as the device tool returns them) in $OUT (default ./gpu_session_out):
#   bench.jsonl      one JSON line per benchmark (python -m benchmarks.bench_*), the numbers for the issue note
#   session.log      every command with its full output
#   tests.log        pytest -m gpu + the connected-components tests
#   profile_train.txt, profile_eval.txt   top kernels (torch.profiler) of the eager 8x3 train / 32x1 eval steps
#   env.txt          nvidia-smi, torch / CUDA versions, clocks before the run
# The summary table is printed last. Each step has its own time limit, ordered by importance, so a slow step
# cannot eat the whole lease; BUDGET_S (default 540) stops starting new steps near the end.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}

WHEELS=(hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 iopath==0.1.10 pycocotools==2.0.11)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # The device image has torch, transformers, tokenizers, tqdm, tensorboard, portalocker, numpy, pillow, scipy,
  # opencv; these are what it lacks. Python there is 3.12; pure-python sdists are built into wheels here.
  mkdir -p .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    if ls .whl/ | grep -qi "^${name//-/_}-" ; then continue; fi
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec" 2>/dev/null \
      || $PY -m pip wheel -q --no-deps -w .whl "$spec" \
      || { echo "could not fetch $spec" >&2; exit 1; }
  done
  ls -l .whl
  exit 0
fi

OUT=${OUT:-$REPO/gpu_session_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
JSONL=$OUT/bench.jsonl
: > "$LOG"; : > "$JSONL"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# torch's cpp_extension must see the real toolkit root, not the folder of an nvcc wrapper on PATH (as the Makefile).
[[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda

note() { echo "== $*" | tee -a "$LOG"; }

# step LIMIT_S NAME CMD...: run CMD with a time limit unless the session budget is nearly spent.
step() {
  local limit=$1 name=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 30 )); then note "SKIP $name (session budget spent)"; return 0; fi
  (( limit > left )) && limit=$left
  note "$name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  note "$name: exit $rc after $(( $(date +%s) - t0 ))s"
  return 0
}

if ls .whl/*.whl > /dev/null 2>&1; then
  note "installing carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 || note "wheel install failed (see session.log)"
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi || true
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import hydra, omegaconf, iopath, pycocotools, transformers; print('hydra', hydra.__version__, 'omegaconf', omegaconf.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

# The CUDA connected-components extension (rsam._C) for the CC tests and bench_cc; Hopper only, to build fast.
step 150 "build rsam._C" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" RSAM_BUILD_ALLOW_ERRORS=0 \
  $PY setup.py -q build_ext --inplace

# BENCH_EXTRA: extra flags for every benchmark, e.g. a CPU dry run of this script:
#   BENCH_EXTRA="--config configs/rsam_demo_cpu.yaml --resolution 64 --warmup 0 --iters 1" bash benchmarks/gpu_session.sh
BT="$PY -m benchmarks.bench_train --out $JSONL ${BENCH_EXTRA:-}"
BE="$PY -m benchmarks.bench_eval --out $JSONL ${BENCH_EXTRA:-}"
# The recipe: configs/rsam_b+_b.yaml, 800 px, 8 images x 3 expressions x 20 tokens, bf16, fused AdamW, clip.
step 120 "train eager 8x3 + profile"  $BT --profile "$OUT/profile_train.txt"
step 90  "eval eager 32x1 + profile"  $BE --profile "$OUT/profile_eval.txt"
step 150 "gpu tests" bash -c "$PY -m pytest -q -m gpu tests > '$OUT/tests.log' 2>&1; \
  $PY -m pytest -q tests/test_connected_components.py >> '$OUT/tests.log' 2>&1; tail -3 '$OUT/tests.log'"
if [[ -f benchmarks/bench_cc.py ]]; then
  step 60 "bench_cc" bash -c "$PY -m benchmarks.bench_cc | tee -a '$JSONL'"
fi
step 240 "train compiled 8x3"          $BT --compile
step 180 "eval compiled 32x1"          $BE --compile
step 90  "train eager 16x3 (memory)"   $BT --images 16 --no-flops
step 90  "train eager 8x3 channels-last" $BT --channels-last --no-flops
step 90  "train eager 8x3 at 1024 px"  $BT --resolution 1024 --no-flops
# the one-GPU recipe's micro-batch (8 images, <= 24 expressions, trunk checkpointing): README "Fine-tuning on one GPU"
step 90  "train 1gpu recipe 8x3 (memory)" $PY -m benchmarks.bench_train --config configs/rsam_b+_b_1gpu.yaml \
  --out $JSONL --no-flops ${BENCH_EXTRA:-}
step 60  "eval eager 32x1 at 1024 px"  $BE --resolution 1024 --no-flops

note "summary ($(( $(date +%s) - START ))s)"
$PY - "$JSONL" <<'EOF' | tee -a "$LOG"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"{'bench':<6} {'res':>5} {'BxK':>6} {'compile':>7} {'cl':>3} {'img/s':>8} {'expr/s':>8} {'step ms':>8} "
      f"{'peak GB':>8} {'TFLOP/s':>8} {'MFU':>6}  gpu / torch")
for r in rows:
    if "bench" not in r or r["bench"] not in ("train", "eval"):
        print(json.dumps(r)[:160]); continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
    tf = f"{r['tflops_per_s']:.1f}" if r.get("tflops_per_s") else "-"
    print(f"{r['bench']:<6} {r['resolution']:>5} {r['images_per_step']:>3}x{r['exprs_per_image']:<2} "
          f"{str(r['compile']):>7} {'y' if r['channels_last'] else 'n':>3} {r['images_per_s']:>8.1f} "
          f"{r['expressions_per_s']:>8.1f} {r['step_ms']:>8.1f} {r['peak_mem_gb']:>8.2f} {tf:>8} {mfu:>6}  "
          f"{r['gpu']} / torch {r['torch']}")
EOF
