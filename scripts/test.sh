#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite (multi-process gloo tests included; GPU tests skip
# without a GPU). Extra arguments go to pytest. Exits with pytest's code.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest "$@"
