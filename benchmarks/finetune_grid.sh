#!/usr/bin/env bash
# The runs behind benchmarks/results/finetune/ (single-device engine, one process per run).
#
#   bash benchmarks/finetune_grid.sh tiny          # byte-level GPT, every weighting (~1 CPU-min/run)
#   bash benchmarks/finetune_grid.sh tiny-adapters # tiny + one adapter per language (--adapters 8)
#   bash benchmarks/finetune_grid.sh smollm2-long  # SmolLM2-135M, 150 steps (~14 CPU-min/run)
#   bash benchmarks/finetune_grid.sh gpu           # SmolLM2-135M, full fine-tuning on one GPU
#   bash benchmarks/finetune_grid.sh smollm2       # SmolLM2-135M, 6 steps (~3 CPU-min/run)
#   bash benchmarks/finetune_grid.sh tiny-why      # tiny, MGDA variants: global/parameter, l2, 3x lr
#   METHODS="mgda-sketch upgrad-global" bash benchmarks/finetune_grid.sh tiny  # variants
#   python scripts/analyze_finetune.py runs/finetune/tiny --out benchmarks/results/finetune/tiny
#
# A method is WEIGHTING[-VARIANT...]: ddp (plain DDP, no hook) or a weighting name, then any of
# global/parameter (granularity), l2 (MGDA on unit-norm gradients), lr3 (3x learning rate),
# lrjitter (lr + 0.1 %), sketch or sketchK (protocol="sketch", k = 4096 or K).
# Needs `python scripts/fetch_corpora.py` and, for smollm2*/gpu, `python scripts/fetch_models.py`.
# Runs whose summary.json exists are skipped, and the long grids checkpoint and resume, so an
# interrupted grid continues where it stopped. SEEDS="1 2 3" and METHODS="ddp mgda ..." override
# the grid; OUT the run root; PYTHON the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: finetune_grid.sh tiny|tiny-adapters|smollm2-long|gpu|smollm2|tiny-why}
out=${OUT:-runs/finetune}/$grid
mkdir -p "$out"
seeds=${SEEDS:-1 2 3}
python=${PYTHON:-.venv/bin/python}
common=(--engine single --data gnome --languages de,fr,ru,ko --unseen uk,es --log-every 1)
tiny=(--model tiny --n-layer 3 --d-model 64 --n-head 4 --steps 300 --batch-size 16 --context 64
    --lr 3e-3 --bucket-cap-mb 0.05 --eval-bytes 4000 --eval-every 50 --log-every 10
    --diag-every 10 --probe)
case $grid in
    tiny)
        config=("${tiny[@]}")
        # Every weighting (mean is DDP's average: the engine's mean must match DDP bit for bit).
        methods=${METHODS:-ddp mean mgda mgda-l2 pcgrad gradvac cagrad imtl_g upgrad dualproj
            aligned_mtl nash_mtl} ;;
    tiny-why)
        config=("${tiny[@]}")
        methods=${METHODS:-mgda-global mgda-parameter mgda-l2 mgda-lr3} ;;
    tiny-adapters)
        # A shared trunk plus one bottleneck adapter (width 8) per seen language after every block;
        # the unseen languages are evaluated on the trunk alone.
        config=("${tiny[@]}" --adapters 8)
        methods=${METHODS:-ddp mean upgrad aligned_mtl} ;;
    smollm2)
        # Pipeline check: the top 4 of 30 blocks trained, 6 steps of 2 x 32 tokens per language.
        config=(--model smollm2-135m --train-layers 4 --steps 6 --warmup 1 --batch-size 2
            --context 32 --lr 3e-4 --bucket-cap-mb 25 --eval-bytes 400 --diag-every 1)
        methods=${METHODS:-ddp mgda pcgrad cagrad} ;;
    smollm2-long)
        # Long enough to fine-tune on a CPU: top 4 of 30 blocks, 150 steps of 2 x 128 tokens per
        # language (~14 CPU-minutes per run with one thread), a checkpoint every 25 steps.
        config=(--model smollm2-135m --train-layers 4 --steps 150 --warmup 15 --batch-size 2
            --context 128 --lr 3e-4 --bucket-cap-mb 25 --eval-bytes 3000 --eval-every 50
            --log-every 5 --diag-every 5 --probe --probe-windows 16 --ckpt-every 25 --resume)
        methods=${METHODS:-ddp upgrad gradvac mgda-l2} ;;
    gpu)
        # One GPU, ~10 minutes for the grid: every block and the embeddings trained in bf16
        # autocast, 300 steps of 8 x 256 tokens per language; pass --dtype fp32 via EXTRA on GPUs
        # without bf16. Checkpoints every 100 steps, so a stopped grid resumes.
        config=(--model smollm2-135m --device cuda --train-layers 0 --train-embeddings
            --steps 300 --warmup 30 --batch-size 8 --context 256 --lr 1e-4 --bucket-cap-mb 25
            --eval-bytes 20000 --eval-every 100 --log-every 10 --diag-every 10 --probe
            --ckpt-every 100 --resume)
        methods=${METHODS:-ddp upgrad gradvac mgda-l2} ;;
    *) echo "unknown grid $grid (tiny, tiny-adapters, smollm2-long, gpu, smollm2, tiny-why)" >&2
        exit 2 ;;
esac
read -ra user_extra <<<"${EXTRA:-}"
for seed in $seeds; do for method in $methods; do
    dir=$out/$method-s$seed
    [[ -f $dir/summary.json ]] && continue
    weighting=${method%%-*}
    extra=()
    for variant in $(tr - ' ' <<<"${method#"$weighting"}"); do
        case $variant in
            global | parameter) extra+=(--granularity "$variant") ;;
            l2) extra+=(--mgda-normalization l2) ;;
            lr3) extra+=(--lr 9e-3) ;;           # tiny: 3x the learning rate
            lrjitter) extra+=(--lr 3.003e-3) ;;  # tiny: lr + 0.1 %, how far a nudge carries
            sketch) extra+=(--protocol sketch) ;;  # the default sketch_size, 4096
            sketch[0-9]*) extra+=(--protocol sketch --sketch-size "${variant#sketch}") ;;
            *) echo "unknown variant $variant in $method" >&2; exit 2 ;;
        esac
    done
    # The pretrained model's step-0 evaluation is the same in every run: do it once.
    [[ $grid =~ ^(smollm2|gpu) && "$method $seed" != "ddp 1" ]] && extra+=(--no-eval-start)
    echo "== $grid $method seed $seed -> $dir"
    nice -n 10 "$python" scripts/finetune_multilingual.py "${common[@]}" "${config[@]}" \
        "${extra[@]}" "${user_extra[@]}" --weighting "$weighting" --seed "$seed" --out "$dir" \
        >"$dir.log" 2>&1 || { echo "failed: see $dir.log" >&2; exit 1; }
    tail -n 3 "$dir.log"
done; done
