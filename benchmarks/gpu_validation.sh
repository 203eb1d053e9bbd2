#!/usr/bin/env bash
# Every GPU check this project still owes, prepared for the few minutes a lent H100/H200 gives:
# tests with compiled Triton, MaskDiT vs DiT at B/2, L/2 and XL/2 (throughput, memory, MFU,
# sampling), torch.profiler breakdowns of the XL/2 steps, DyDiT XL/2 sampling speed-up at lambda
# 0.7/0.5/0.3, loader throughput next to the XL/2 step rate, kernel microbenchmarks, and short bf16
# MNIST trainings with kernels on and off (same seed: losses must agree) with their sample grids.
#
#   bash benchmarks/gpu_validation.sh core    # what the open issues need first: the memory plan against
#                                             # max_memory_allocated at XL/2 (batches 32, 64), static
#                                             # kernel report for this GPU, kernel tests, XL/2
#                                             # report, DyDiT XL/2, loaders, XL/2 MaskDiT profile
#   bash benchmarks/gpu_validation.sh more    # one optimizer step at XL/2 (AdamW vs apex FusedAdam), the
#                                             # rest of the suite on the GPU, kernels, B/2 + L/2, DiT
#                                             # profile, MNIST bf16 runs, XL/2 torch.compile
#   bash benchmarks/gpu_validation.sh sweep   # the batch sweep of DiT and MaskDiT (kernels off/on) at
#                                             # XL/2 and each one's largest batch within 40 GiB
#   bash benchmarks/gpu_validation.sh smoke   # CPU, tiny shapes: checks every command of this script
#
# Step limits add up to 490 s (core), 525 s (more) and 480 s (sweep). With the device tool: carry
# [".whl"] (omegaconf, antlr4, diffusers, importlib-metadata, lazy-importer wheels for Python 3.12;
# see benchmarks/results/README.md) and timeout_s 540 (600 for more: wheel install and slack). A
# session's 15 device minutes hold the machine's start, core, and part of more (ONLY=...). A failed
# step does not stop the others. After every step $OUT/summary-PHASE.md (steps, exit codes, seconds,
# headlines) and $OUT/results-PHASE.tar.gz (logs, JSON, markdown, pictures) are rewritten, so a call
# cut short still returns what finished. Without $OUT they go to ./gpu-validation-out. ONLY="step
# step ..." runs only the named steps of the phase (e.g. to repeat one that failed).
set -uo pipefail
phase=${1:-core}
case $phase in core|more|sweep|smoke) ;; *) echo "usage: $0 core|more|sweep|smoke" >&2; exit 2 ;; esac
OUT=${OUT:-$PWD/gpu-validation-out}
GPU_VALIDATION_WORK=${GPU_VALIDATION_WORK:-/tmp/gpu-validation}
WORK=$GPU_VALIDATION_WORK/$phase
[ -z "${ONLY:-}" ] && rm -rf "$WORK"  # ONLY=...: a rerun of some steps keeps the others' results
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "$phase" != smoke ] && compgen -G ".whl/*.whl" > /dev/null; then  # the device image lacks these pure-Python packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
PY=${PYTHON:-python3}
SUMMARY=$OUT/summary-$phase.md
STEPS=$WORK/steps.md
HEADLINES=$WORK/headlines.txt
if [ -z "${ONLY:-}" ] || [ ! -f "$STEPS" ]; then
  { echo "# gpu_validation.sh $phase: $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo; echo "| step | exit | seconds |"; echo "|---|--:|--:|"; } > "$STEPS"
fi

# headline FILE PATTERN: the summary quotes the lines of FILE (when it exists) that match PATTERN.
HEADLINE_SPECS=()
headline() { HEADLINE_SPECS+=("$1" "$2"); }

# package: rewrites the summary and the tarball from what is in $WORK now.
package() {
  local i
  : > "$HEADLINES"
  for ((i = 0; i < ${#HEADLINE_SPECS[@]}; i += 2)); do
    [ -f "${HEADLINE_SPECS[i]}" ] && grep -h -E "${HEADLINE_SPECS[i + 1]}" "${HEADLINE_SPECS[i]}" >> "$HEADLINES"
  done
  { cat "$STEPS"; echo; echo "Headlines:"; echo; cat "$HEADLINES"; } > "$SUMMARY"
  # weights and training states stay behind: the device returns files of at most 16 MiB
  tar -czf "$OUT/results-$phase.tar.gz.part" --exclude "*.trace.json" --exclude "*.safetensors" \
    --exclude "checkpoints" -C "$(dirname "$WORK")" "$phase" \
    && mv "$OUT/results-$phase.tar.gz.part" "$OUT/results-$phase.tar.gz"
}

# step NAME SECONDS CMD...: runs CMD under a time limit, logs to $WORK/NAME.log, records the result.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" bash -c '"$@"' bash "$@" > "$WORK/$name.log" 2>&1  # bash: functions too
  rc=$?
  echo "| $name | $rc$([ $rc -eq 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) |" >> "$STEPS"
  tail -n 4 "$WORK/$name.log"
  package
  return 0
}

if [ "$phase" = smoke ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DEV=cpu
else
  DEV=cuda
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')" || exit 1
fi

env_info() {
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'EOF'
import platform, torch, triton, kernels
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__, "attention backends", kernels.available_attention_backends())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
EOF
}

# MNIST, same seed, kernels on vs off (and the DiT baseline): losses must agree within bf16 noise.
mnist_runs() {
  local steps=$1 eval_samples=$2 extra=$3
  for run in maskdit-triton:"model.kernels=triton" maskdit-reference:"model.kernels=reference" \
             dit-triton:"model.kernels=triton model.arch=dit model.mask_ratio=0"; do
    # shellcheck disable=SC2086
    $PY train.py --out "$WORK/mnist-${run%%:*}" --no-progress --eval-samples "$eval_samples" train.max_steps=$steps \
      train.unmasked_steps=$((steps / 4)) train.sample_every=$steps train.ckpt_every=$steps ${run#*:} $extra \
      || return 1
  done
  $PY - "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
def losses(run):
    rows = [json.loads(l) for l in (work / f"mnist-{run}" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r]
on, off = losses("maskdit-triton"), losses("maskdit-reference")
tail = max(1, len(on) // 4)
a, b = statistics.mean(on[-tail:]), statistics.mean(off[-tail:])
first = abs(on[0] - off[0]) / abs(off[0])
print(f"MNIST MaskDiT kernels on vs off: first logged loss rel. diff {first:.2e}; "
      f"mean of the last {tail} logged losses {a:.4f} vs {b:.4f} ({abs(a - b) / b:.1%} apart)")
sys.exit(0 if first < 2e-2 and abs(a - b) / b < 0.05 else "kernels on and off disagree")
EOF
}

# The loaders' samples/s next to the XL/2 training steps' images/s of the core phase's report.
loaders_vs_step() {
  local synthetic=$1 batch=$2 workers=$3
  $PY -m benchmarks.data_loaders --synthetic "$synthetic" --batch "$batch" --loader torch --workers "$workers" \
    --device "$DEV" --json "$WORK/loaders.json" || return 1
  $PY - "$WORK/loaders.json" "$GPU_VALIDATION_WORK/core/report-xl2/report.json" <<'EOF'
import json, sys
from pathlib import Path
for row in json.loads(Path(sys.argv[1]).read_text())["loaders"]:
    print(f"{row['loader']} loader on {row['device']}: {row['samples_per_s']:,.0f} samples/s (batch {row['batch']})")
report = Path(sys.argv[2])
if report.exists():
    rows = [r for r in json.loads(report.read_text())["train"] if r["status"] == "ok"]
    print("XL/2 training images/s (core phase):", {r["variant"]: round(r["images_per_s"], 1) for r in rows})
else:
    print("no core-phase XL/2 report on this machine: compare with a report.json by hand")
EOF
}

# The static kernel report (benchmarks/kernels/static.py) for this machine's GPU (sm_90 and sm_80
# without one): it compiles, launches nothing, and fails on a missed target. Not under the interpreter.
static_report() {
  local gpus
  gpus=$($PY -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else 'sm_90,sm_80')") || return 1
  env -u TRITON_INTERPRET "$PY" -m benchmarks.kernels.static --check --gpus "$gpus" --json "$WORK/static-kernels.json"
}

XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)
export PY DEV WORK GPU_VALIDATION_WORK
export -f env_info mnist_runs loaders_vs_step static_report

case $phase in
core)
  headline "$WORK/report-xl2/report.md" "^- (fastest|highest|targets)"
  headline "$WORK/dydit-xl2.md" "^\| "
  headline "$WORK/loaders.log" "loader on|XL/2 training|no core-phase"
  headline "$WORK/static-kernels.log" "targets missed"
  headline "$WORK/plan-xl2.log" "^\\| (dit|maskdit) "
  step env 20 env_info
  step plan-xl2 40 $PY -m benchmarks.plan_check --device cuda --model XL/2 --batches 32,64 \
    --json "$WORK/plan-xl2.json"
  step static-kernels 60 static_report
  step tests-kernels 80 $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/kernels tests/dydit/test_tokens.py \
    --ignore tests/kernels/test_static_report.py
  step report-xl2 130 $PY -m benchmarks.report --device cuda --models XL/2 --batch 64 \
    --variants dit+kernels,mask50,mask50+kernels --sample-variants dit,maskdit+kernels --sweep-batch none \
    --warmup 5 --steps 20 --sample-steps 18 --sample-reps 3 --out "$WORK/report-xl2"
  step dydit-xl2 80 $PY benchmarks/dydit.py --size XL/2 --device cuda --n 64 --batch 64 --reps 3 \
    --out "$WORK/dydit-xl2"
  step loaders 50 loaders_vs_step 100000 256 8
  step profile-xl2-mask50 40 $PY -m benchmarks.profile_step --device cuda --model XL/2 --variant mask50+kernels \
    --batch 64 --out "$WORK/profile-xl2-mask50+kernels"
  package
  ;;
more)
  headline "$WORK/mnist.log" "apart"
  headline "$WORK/report-xl2-compiled/report.md" "^- (fastest|highest)"
  headline "$WORK/optimizer-step-xl2.log" "^\\{"
  step optimizer-step-xl2 30 $PY -m benchmarks.optimizer_step --device cuda --model XL/2 \
    --json "$WORK/optimizer-step-xl2.json"
  step tests-rest 150 $PY -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests --ignore tests/kernels
  step kernels-bf16 45 $PY -m benchmarks.kernels.bench --dtype bf16 --json "$WORK/kernels-bf16.json"
  step report-b2-l2 70 $PY -m benchmarks.report --device cuda --models B/2,L/2 --batch 64 \
    --variants dit+kernels,mask50,mask50+kernels --sample-variants none --sweep-batch none --warmup 5 --steps 20 \
    --out "$WORK/report-b2-l2"
  step profile-xl2-dit 45 $PY -m benchmarks.profile_step --device cuda --model XL/2 --variant dit+kernels \
    --batch 64 --out "$WORK/profile-xl2-dit+kernels"
  step mnist 100 mnist_runs 1200 500 ""
  step report-xl2-compiled 85 $PY -m benchmarks.report --device cuda --models XL/2 --batch 64 \
    --variants dit+kernels+compile,mask50+kernels+compile --sample-variants none --sweep-batch none --warmup 5 \
    --steps 20 --out "$WORK/report-xl2-compiled"
  package
  ;;
sweep)
  headline "$WORK/sweep-xl2/report.md" "^- .mask50"
  headline "$WORK/max-batch-xl2/report.md" "^- largest batch"
  step sweep-xl2 240 $PY -m benchmarks.report --device cuda --models XL/2 --batch 64 --variants dit \
    --sample-variants none --sweep-batch 16,32,64,128,256 --memory-budget 0 --warmup 3 --steps 8 \
    --out "$WORK/sweep-xl2"
  step max-batch-xl2 240 $PY -m benchmarks.report --device cuda --models XL/2 --batch 16 --variants dit \
    --sample-variants none --sweep-batch 64 --memory-budget 40 --warmup 1 --steps 2 --out "$WORK/max-batch-xl2"
  package
  ;;
smoke)
  headline "$WORK/report-tiny/report.md" "^- (fastest|highest|targets)"
  headline "$WORK/dydit-tiny.md" "^\| "
  headline "$WORK/loaders.log" "loader on|XL/2 training|no core-phase"
  headline "$WORK/mnist.log" "apart"
  headline "$WORK/static-kernels.log" "targets missed"
  headline "$WORK/optimizer-step.log" "^\\{"
  headline "$WORK/plan.log" "^\\| (dit|maskdit) "
  step env 60 env_info
  step static-kernels 600 static_report
  step tests-kernels 600 $PY -m pytest -q -p no:cacheprovider tests/dydit/test_tokens.py
  step report 600 $PY -m benchmarks.report --tiny --device cpu --out "$WORK/report-tiny" --no-plots
  step dydit 300 $PY benchmarks/dydit.py --tiny --out "$WORK/dydit-tiny"
  step loaders 120 loaders_vs_step 2000 64 1
  step profile 120 $PY -m benchmarks.profile_step --tiny --variant mask50 --out "$WORK/profile-tiny"
  step kernels 300 $PY -m benchmarks.kernels.bench --tiny --json "$WORK/kernels.json"
  step optimizer-step 120 $PY -m benchmarks.optimizer_step --tiny --json "$WORK/optimizer-step.json"
  step plan 120 $PY -m benchmarks.plan_check --tiny --json "$WORK/plan.json"
  step mnist 900 mnist_runs 12 0 "train.log_every=2 train.global_batch=4 sample.num_steps=2 sample.grid_per_class=1 model.depth=2 model.hidden_size=64 model.decoder_depth=1"
  package
  ;;
esac
cat "$SUMMARY"
