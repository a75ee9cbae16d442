#!/usr/bin/env bash
# One GPU, one call of about 5 minutes: check tplab's GPU paths, measure the 70B sweep, calibrate the cost model.
#
#   OUT=/tmp/gpu TPLAB_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_session.sh
#
# Run from the repository root with torch (CUDA build), transformers, safetensors, tqdm, matplotlib and pytest
# installed; tplab itself need not be (PYTHONPATH=.). Each step writes into $OUT:
#
#   machine.txt       nvidia-smi, Python, torch, CUDA, transformers
#   test_gpu.log      tests/test_gpu.py: the TP model on CUDA against HF, CUDA-graph decode, CUDA-event roofline,
#                     torchrun + NCCL with one process
#   *_emulated_*.jsonl  rank 0 of Llama-3-70B (BF16, random weights) at each tp in TPS, timed alone on this GPU,
#                     collectives modelled for GPU's NVLink; one bench per tp, so a failure loses that tp only
#   bench.log         the sweep's modelled duration (--dry-run), the benches' tables, the calibration
#   efficiency-GPU.json  the cost model's efficiencies fitted to those records (python -m tplab plan --efficiency)
#
# If the first bench fails other than by time (most likely the CUDA-graph decode, which no GPU had run before this
# script), it is rerun with --decode eager, and so are the others.
#
# Sized for 15 minutes of GPU time (10 minutes per command): LAYERS=20 of the 80 layers are built, and every
# record also extrapolates them to 80 ("scaled": arithmetic, labelled so). LAYERS=80 measures the whole rank
# in about 4 times as long. The steps' time limits add up to 10.5 minutes (120 s tests, 30 s dry run, 3 x 150 s
# benches, 30 s calibration); the cost model expects the benches' timed requests to take under 2 minutes. Each
# bench's records are written when it ends, so a call cut short keeps the tps done; the calibration needs no GPU
# and can be rerun anywhere from the records. Copy the .jsonl files into data/measurements/ to commit them.
set -uo pipefail

OUT=${OUT:?set OUT to the folder for the results}
GPU=${GPU:-h200}
MODEL=${MODEL:-llama-3-70b}
LAYERS=${LAYERS:-20}
TPS=${TPS:-8 4 2}
BATCHES=${BATCHES:-1,8,32,64}
PROMPTS=${PROMPTS:-128,2048}
STEPS=${STEPS:-8}
REPEATS=${REPEATS:-3}
DECODE=${DECODE:-}  # the first tp's decode mode; empty: the bench's default, a CUDA graph on a GPU
TEST_TIMEOUT=${TEST_TIMEOUT:-120}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}  # per tp; the dry run prints the modelled time of each point
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$SECONDS
FAILED=$(mktemp)  # one line per failed step (steps run in pipelines, so a shell variable would not survive)

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
  local name=$1 seconds=$2 status; shift 2
  echo "=== $name ($(date -u +%H:%M:%S), limit ${seconds}s): $*"
  timeout "$seconds" "$@"; status=$?
  if ((status)); then echo "=== $name FAILED (exit $status$( ((status == 124)) && echo ', timed out'))"; echo "$name" >>"$FAILED"; fi
  return $status
}

{
  nvidia-smi || echo "no nvidia-smi"
  "$PYTHON" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| transformers", transformers.__version__, "| GPU visible:", torch.cuda.is_available())'
  echo "tplab commit: ${TPLAB_GIT_COMMIT:-unknown (set TPLAB_GIT_COMMIT)}"
} 2>&1 | tee "$OUT/machine.txt"

step test_gpu "$TEST_TIMEOUT" "$PYTHON" -m pytest tests/test_gpu.py -v -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log"

sweep=(--emulate-rank --model "$MODEL" --gpu "$GPU" --layers "$LAYERS" --batch "$BATCHES" --prompt-len "$PROMPTS"
       --decode-steps "$STEPS" --repeats "$REPEATS")
{
  step dry-run 30 "$PYTHON" -m tplab bench "${sweep[@]}" --tp "${TPS// /,}" --dry-run  # modelled duration, to compare
  decode=$DECODE first=1
  for tp in $TPS; do
    step "bench tp=$tp" "$BENCH_TIMEOUT" "$PYTHON" -m tplab bench "${sweep[@]}" ${decode:+--decode "$decode"} \
      --tp "$tp" --quiet --out "$OUT"; status=$?
    if ((first && status && status != 124)) && [[ $decode != eager ]]; then
      # the first tp failed, not for time: most likely the CUDA-graph decode (never run on a GPU before). The eager
      # decode still measures, so this tp and the next ones use it: the GPU time yields data either way.
      decode=eager
      echo "=== retrying with --decode eager"
      step "bench tp=$tp, eager decode" "$BENCH_TIMEOUT" "$PYTHON" -m tplab bench "${sweep[@]}" --decode eager \
        --tp "$tp" --quiet --out "$OUT"
    fi
    first=0
  done
} 2>&1 | tee "$OUT/bench.log"

shopt -s nullglob
records=("$OUT"/*_emulated_*.jsonl)
if ((${#records[@]})); then
  step calibrate 30 "$PYTHON" -m tplab bench --calibrate "${records[@]}" --gpu "$GPU" \
    --efficiency-out "$OUT/efficiency-$GPU.json" 2>&1 | tee -a "$OUT/bench.log"
else
  echo "=== calibrate skipped: no records"; echo calibrate >>"$FAILED"
fi

if [[ -s $FAILED ]]; then echo "=== done in $((SECONDS - START)) s with failures: $(paste -sd, "$FAILED")"; exit 1; fi
echo "=== done in $((SECONDS - START)) s: every step passed"
