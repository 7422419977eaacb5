#!/usr/bin/env bash
# The runs behind benchmarks/results/finetune/ (single-device engine, one process per run).
#
#   bash benchmarks/finetune_grid.sh smollm2   # SmolLM2-135M on gnome-user-docs (~3 CPU-min/run)
#   bash benchmarks/finetune_grid.sh tiny      # byte-level GPT from scratch (~1 CPU-min/run)
#   bash benchmarks/finetune_grid.sh tiny-why  # tiny, MGDA variants: global/parameter, l2, 3x lr
#   METHODS="mgda-sketch pcgrad-sketch" bash benchmarks/finetune_grid.sh tiny  # sketched Gramians
#   python scripts/analyze_finetune.py runs/finetune --out benchmarks/results/finetune
#
# Needs `python scripts/fetch_corpora.py` and, for smollm2, `python scripts/fetch_models.py`.
# Runs whose summary.json exists are skipped, so an interrupted grid continues where it stopped.
# SEEDS="1 2 3" and METHODS="ddp mgda ..." override the grid; OUT the run root.
# No `mean` run: with one rank per language DDP's average is the mean weighting, bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: finetune_grid.sh smollm2|tiny|tiny-why}
out=${OUT:-runs/finetune}/$grid
mkdir -p "$out"
seeds=${SEEDS:-1 2 3}
common=(--engine single --data gnome --languages de,fr,ru,ko --unseen uk,es --log-every 1)
case $grid in
    smollm2)
        # CPU scale: the top 4 of 30 blocks trained, 6 steps of 2 x 32 tokens per language.
        config=(--model smollm2-135m --train-layers 4 --steps 6 --warmup 1 --batch-size 2
            --context 32 --lr 3e-4 --bucket-cap-mb 25 --eval-bytes 400 --diag-every 1)
        methods=${METHODS:-ddp mgda pcgrad cagrad} ;;
    tiny | tiny-why)
        config=(--model tiny --n-layer 3 --d-model 64 --n-head 4 --steps 300 --batch-size 16
            --context 64 --lr 3e-3 --bucket-cap-mb 0.05 --eval-bytes 4000 --eval-every 50
            --log-every 10 --diag-every 10 --probe)
        # gradvac too: its EMA targets need the hundreds of steps that this grid has.
        methods=${METHODS:-ddp mgda pcgrad cagrad gradvac}
        [[ $grid == tiny-why ]] && methods=${METHODS:-mgda-global mgda-parameter mgda-l2 mgda-lr3}
        ;;
    *) echo "unknown grid $grid (smollm2, tiny or tiny-why)" >&2; exit 2 ;;
esac
for seed in $seeds; do for method in $methods; do
    dir=$out/$method-s$seed
    [[ -f $dir/summary.json ]] && continue
    extra=()
    case $method in  # the investigation's variants: METHOD-VARIANT
        *-global | *-parameter) extra=(--granularity "${method#*-}") ;;
        *-l2) extra=(--mgda-normalization l2) ;;
        *-lr3) extra=(--lr 9e-3) ;;
        *-lrjitter) extra=(--lr 3.003e-3) ;;  # tiny: lr + 0.1 %, how far a nudge carries
        *-sketch) extra=(--protocol sketch) ;;  # the default sketch_size, 4096
        *-sketch[0-9]*) extra=(--protocol sketch --sketch-size "${method##*-sketch}") ;;
    esac
    # The pretrained model's step-0 evaluation is the same in every run: do it once.
    [[ $grid == smollm2 && "$method $seed" != "ddp 1" ]] && extra+=(--no-eval-start)
    echo "== $grid $method seed $seed -> $dir"
    nice -n 10 .venv/bin/python scripts/finetune_multilingual.py "${common[@]}" "${config[@]}" \
        "${extra[@]}" --weighting "${method%%-*}" --seed "$seed" --out "$dir" >"$dir.log" 2>&1 ||
        { echo "failed: see $dir.log" >&2; exit 1; }
    tail -n 3 "$dir.log"
done; done
