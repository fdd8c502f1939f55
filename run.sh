#!/usr/bin/env bash
# Entry point: sets everything up (scripts/bootstrap.sh), then runs one job.
#   bash run.sh demo     quantize the bundled ResNet-20 to W4A4 and report accuracy, size, time
#   bash run.sh test     run the test suite
#   bash run.sh lowbit ARGS...   any lowbit command
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
job=${1:-demo}; shift || true
case "$job" in
  demo) exec .venv/bin/lowbit quantize --model resnet20 --w-bits 4 --a-bits 4 --method bitsplit "$@" ;;
  # two workers of one thread each keep both cores busy (the suite is many small tests); LOWBIT_TEST_WORKERS=0 runs serially
  test) exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -n "${LOWBIT_TEST_WORKERS:-2}" "$@" ;;
  lowbit) exec .venv/bin/lowbit "$@" ;;
  bench) exec .venv/bin/python "$@" ;;
  *) echo "usage: bash run.sh {demo|test|lowbit ARGS|bench SCRIPT}" >&2; exit 2 ;;
esac
