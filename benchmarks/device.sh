#!/usr/bin/env bash
# The accelerator benchmarks as one prepared run (issue 13: the three benchmarks once in bf16 on a GPU, and the
# MFU of the paper-size split step). Made for a machine lent through the `device` tool (one H200, Python 3.12 with
# JAX+CUDA, PyTorch, flax, optax, orbax-checkpoint and transformers installed, no package registry), and fit for
# any CUDA host that has those.
#
#   bash benchmarks/device.sh wheels     here, with the registry: the Python 3.12 wheels of the packages such a
#                                        machine lacks, pinned, into .whl/ (git-ignored; carry it along)
#   bash benchmarks/device.sh run [DIR]  there: installs .whl/ (when present) into /tmp/site, then runs, each bounded
#                                        in time and logged to DIR (default $OUT, else /tmp/qtl_bench):
#                                        1. train_step.py --dtype bfloat16 (JAX vs PyTorch, model TFLOP/s and MFU)
#                                        2. generate.py --bf16 --skip-eval (OpenELM-270M greedy decoding, batch 8)
#                                        3. models.py --bf16 (SigLIP forward, OpenELM forward + backward)
#                                        A benchmark that fails or runs out of time does not stop the next ones;
#                                        the exit status is that of the first failure.
#
# Time limits (seconds; the device tool allows 600 a command): QTL_TRAIN_STEP_S (240), QTL_GENERATE_S (120),
# QTL_MODELS_S (240). Extra flags per script: QTL_TRAIN_STEP_FLAGS, QTL_GENERATE_FLAGS, QTL_MODELS_FLAGS.
set -uo pipefail
cd "$(dirname "$0")/.."

# What the three scripts import and the device machine's image lacks (its package list:
# ../.library/device/KINDS.md), pinned to the versions the test suite runs with. generate.py's evaluation part (a),
# the only one that needs tensorflow-datasets and the configs' packages, is not run there (--skip-eval).
WHEELS=(constriction==0.5.0 openelm-pytorch==0.1.0)
PY=${PYTHON:-python3}

wheels() {
  mkdir -p .whl
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  ls -l .whl
}

bench() {  # name, seconds, command...
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date -u +%T), at most ${seconds} s): $*" | tee -a "$DIR/summary.log"
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc ($(date -u +%T))" | tee -a "$DIR/summary.log"
  [ "$rc" -eq 0 ] || [ "$STATUS" -ne 0 ] || STATUS=$rc
}

run() {
  DIR=${1:-${OUT:-/tmp/qtl_bench}}
  mkdir -p "$DIR"
  STATUS=0
  if [ -d .whl ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || { echo "device.sh: could not install .whl/ (Python 3.12 wheels) with $PY" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  # One process at a time shares the chip with the next: no JAX process takes 75% of its memory up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
torch.cuda.is_available())"; } 2>&1 | tee "$DIR/summary.log"
  # shellcheck disable=SC2086  # the flag variables are word lists
  bench train_step "${QTL_TRAIN_STEP_S:-240}" "$PY" benchmarks/train_step.py --dtype bfloat16 --skip-before \
    --skip-compile --repeats 10 ${QTL_TRAIN_STEP_FLAGS:-}
  # shellcheck disable=SC2086
  bench generate "${QTL_GENERATE_S:-120}" "$PY" benchmarks/generate.py --bf16 --skip-eval --repeats 5 \
    ${QTL_GENERATE_FLAGS:-}
  # shellcheck disable=SC2086
  bench models "${QTL_MODELS_S:-240}" "$PY" benchmarks/models.py --bf16 --skip-compile --repeats 5 ${QTL_MODELS_FLAGS:-}
  exit "$STATUS"
}

case "${1:-}" in
  wheels) wheels ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/device.sh wheels | run [DIR]" >&2; exit 2 ;;
esac
