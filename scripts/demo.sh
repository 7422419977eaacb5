#!/usr/bin/env bash
# The main job: multilingual fine-tuning of a tiny byte-level transformer on 4 CPU ranks (gloo),
# one language per rank, with bucket-level MGDA in DDP's gradient all-reduce.
# Extra arguments go to the script, e.g. `bash scripts/demo.sh --weighting mean`.
# Logs, diagnostics and the summary go to runs/demo/ (--out to change).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo   # torch, this package and numpy; no test extras
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/torchrun --standalone --nproc-per-node "${NPROC:-4}" \
    scripts/finetune_multilingual.py --out runs/demo "$@"
