#!/usr/bin/env bash
# The checks that need a CUDA device, in one go, for a GPU machine with this project installed:
# the CUDA tests (tests/test_cuda.py and the CUDA cases elsewhere: the deferred guard's skips
# against step mode, bit for bit, with the fused optimizers), then the bench on the GPU (digits
# MLP with SGD: the issue-14 variants, and the guard's share (off; reading its flag every step;
# fp16 with the flag deferred into GradScaler's found_inf and read every step);
# the character Transformer). Exits non-zero if any part failed; logs and the bench's JSON go
# to the folder given (default outputs/gpu_check/<time>).
#
#     bash scripts/gpu_check.sh [out_dir]
#
# Each part runs under a time limit (scaled by GPU_CHECK_LIMIT, default 1; a part that hangs is
# stopped, reported and counted as failed, and the next one runs) and starts with a timestamped
# line, so that a machine lent for a few minutes always returns what ran. PYTHON picks the
# interpreter (default: python, else python3).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out=${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$out" || exit 1
export PYTHONUNBUFFERED=1
# the project importable without an install (scripts/bench.py imports trainer: on a machine
# with torch but not this package, the benches failed with "No module named 'trainer'")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-$(command -v python || command -v python3)}
scale=${GPU_CHECK_LIMIT:-1}
awk -v k="$scale" 'BEGIN { exit !(k + 0 > 0) }' || { echo "GPU_CHECK_LIMIT: got '$scale', must be a number > 0"; exit 2; }
status=0
# part NAME SECONDS LOG CMD...: CMD under a limit of SECONDS × scale, its output also in LOG
part() {
  local name=$1 limit log=$3 code
  limit=$(awk -v s="$2" -v k="$scale" 'BEGIN { l = int(s * k); printf "%d", l < 1 ? 1 : l }')
  shift 3
  echo "== $(date +%T) $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  code=$?
  { [ "$code" = 124 ] || [ "$code" = 137 ]; } && echo "== $name: stopped at its limit of ${limit} s"
  [ "$code" = 0 ] || status=1
  return "$code"
}
part device 180 "$out/device.log" "$py" -c "import sys, torch; torch.cuda.is_available() or \
sys.exit('no CUDA device: these checks need one'); print('torch', torch.__version__, 'on', \
torch.cuda.get_device_name()); import trainer" || exit 1
part tests 300 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -rs -k cuda \
  tests/test_cuda.py tests/test_instrument.py::test_float32_norms_on_cuda_are_those_of_the_cpu \
  tests/test_nonfinite.py::test_deferred_skip_equals_step_mode_bitwise \
  tests/test_nonfinite.py::test_fp16_deferred_skip_equals_step_mode_bitwise \
  tests/test_nonfinite.py::test_fp16_first_step_overflow_leaves_no_momentum_behind \
  tests/test_nonfinite.py::test_a_late_first_gradient_trains_with_the_fused_sgd \
  tests/test_nonfinite.py::test_gives_up_after_consecutive_skips_and_updates_nothing_from_there
part bench_mlp 300 "$out/bench_mlp.log" "$py" scripts/bench.py --device cuda --no-cli \
  --steps 2000 --rounds 3 --out "$out/bench_mlp.json" optimizer=sgd --variant "instrument=none" \
  --variant "instrument.norms.every_n_steps=1" --variant "instrument.per_sample.every_n_steps=10" \
  --variant "instrument=none instrument.histograms.every_n_steps=100" \
  --variant "instrument.nonfinite.policy=off" --variant "instrument.nonfinite.sync=step" \
  --variant "trainer.precision=16" --variant "trainer.precision=16 instrument.nonfinite.sync=step"
part bench_lm 240 "$out/bench_lm.log" "$py" scripts/bench.py --device cuda --no-cli \
  --steps 300 --rounds 3 --out "$out/bench_lm.json" experiment=chars_lm \
  --variant "instrument=none" --variant "instrument.norms.every_n_steps=1" \
  --variant "instrument.per_sample.every_n_steps=10"
echo "== $(date +%T) gpu_check: $([ $status = 0 ] && echo passed || echo FAILED), logs in $out"
exit $status
