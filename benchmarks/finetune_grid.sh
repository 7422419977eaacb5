#!/usr/bin/env bash
# The runs behind benchmarks/results/finetune/ (single-device engine, one process per run).
#
#   bash benchmarks/finetune_grid.sh smollm2   # SmolLM2-135M on gnome-user-docs (CPU: ~4 min/run)
#   bash benchmarks/finetune_grid.sh tiny      # byte-level GPT from scratch, same corpus
#   python scripts/analyze_finetune.py runs/finetune --out benchmarks/results/finetune
#
# Needs `python scripts/fetch_corpora.py` and, for smollm2, `python scripts/fetch_models.py`.
# Runs whose summary.json exists are skipped, so an interrupted grid continues where it stopped.
# SEEDS="1 2 3" and METHODS="ddp mgda pcgrad cagrad" override the grid; OUT the run root.
set -euo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: finetune_grid.sh smollm2|tiny}
out=${OUT:-runs/finetune}/$grid
mkdir -p "$out"
seeds=${SEEDS:-1 2 3}
methods=${METHODS:-ddp mgda pcgrad cagrad}
common=(--engine single --data gnome --languages de,fr,ru,ko --unseen uk,es --log-every 1)
case $grid in
    smollm2)
        # CPU scale: the top 4 of 30 blocks trained, 10 steps of 2 x 32 tokens per language.
        config=(--model smollm2-135m --train-layers 4 --steps 10 --warmup 1 --batch-size 2
            --context 32 --lr 3e-4 --bucket-cap-mb 25 --eval-bytes 500 --threads 2
            --diag-every 1) ;;
    tiny)
        config=(--model tiny --n-layer 4 --d-model 96 --n-head 4 --steps 600 --batch-size 16
            --context 64 --lr 3e-3 --bucket-cap-mb 0.1 --eval-bytes 6000 --eval-every 100
            --log-every 10 --diag-every 10 --probe) ;;
    *) echo "unknown grid $grid (smollm2 or tiny)" >&2; exit 2 ;;
esac
# mean on one seed: with one rank per language it is DDP's average, bit for bit.
runs=()
for seed in $seeds; do for method in $methods; do runs+=("$method $seed"); done; done
runs+=("mean ${seeds%% *}")
for run in "${runs[@]}"; do
    read -r method seed <<<"$run"
    dir=$out/$method-s$seed
    [[ -f $dir/summary.json ]] && continue
    extra=()
    # The pretrained model's step-0 evaluation is the same in every run: do it once.
    [[ $grid == smollm2 && $run != "ddp ${seeds%% *}" ]] && extra=(--no-eval-start)
    echo "== $grid $method seed $seed -> $dir"
    nice -n 10 .venv/bin/python scripts/finetune_multilingual.py "${common[@]}" "${config[@]}" \
        "${extra[@]}" --weighting "$method" --seed "$seed" --out "$dir" >"$dir.log" 2>&1 ||
        { echo "failed: see $dir.log" >&2; exit 1; }
    tail -n 3 "$dir.log"
done
