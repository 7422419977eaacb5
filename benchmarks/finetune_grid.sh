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
# global/parameter (granularity; not with ddp), l2 (MGDA on unit-norm gradients; mgda only),
# lr3 (3x the grid's learning rate), lrjitter (lr + 0.1 %), sketch or sketchK
# (protocol="sketch", k = 4096 or K).
# Needs `python scripts/fetch_corpora.py` and, for smollm2*/gpu, `python scripts/fetch_models.py`.
# Runs whose summary.json exists are skipped, and the long grids checkpoint and resume, so an
# interrupted grid continues where it stopped. SEEDS="1 2 3" and METHODS="ddp mgda ..." override
# the grid; PYTHON the interpreter (default .venv/bin/python); EXTRA more options for every run
# (they come last, so they win); OUT the run root (default runs/finetune): set it with EXTRA,
# since a run directory that exists is skipped or resumed whatever its options were.
set -euo pipefail
cd "$(dirname "$0")/.."
grid=${1:?usage: finetune_grid.sh tiny|tiny-adapters|smollm2-long|gpu|smollm2|tiny-why}
out=${OUT:-runs/finetune}/$grid
mkdir -p "$out"
seeds=${SEEDS:-1 2 3}
python=${PYTHON:-.venv/bin/python}
common=(--engine single --data gnome --languages de,fr,ru,ko --unseen uk,es --log-every 1)
lr=3e-3
tiny=(--model tiny --n-layer 3 --d-model 64 --n-head 4 --steps 300 --batch-size 16 --context 64
    --bucket-cap-mb 0.05 --eval-bytes 4000 --eval-every 50 --log-every 10
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
        # the unseen languages are evaluated on the trunk alone. Here mean differs from ddp: an
        # adapter gets its language's whole gradient (absent objectives), under DDP 1/4 of it.
        config=("${tiny[@]}" --adapters 8)
        methods=${METHODS:-ddp mean gradvac upgrad mgda-l2} ;;
    smollm2)
        # Pipeline check: the top 4 of 30 blocks trained, 6 steps of 2 x 32 tokens per language.
        lr=3e-4
        config=(--model smollm2-135m --train-layers 4 --steps 6 --warmup 1 --batch-size 2
            --context 32 --bucket-cap-mb 25 --eval-bytes 400 --diag-every 1)
        methods=${METHODS:-ddp mgda pcgrad cagrad} ;;
    smollm2-long)
        # Long enough to fine-tune on a CPU: top 4 of 30 blocks, 150 steps of 2 x 128 tokens per
        # language (~14 CPU-minutes per run with one thread), a checkpoint every 25 steps.
        lr=3e-4
        config=(--model smollm2-135m --train-layers 4 --steps 150 --warmup 15 --batch-size 2
            --context 128 --bucket-cap-mb 25 --eval-bytes 3000 --eval-every 50
            --log-every 5 --diag-every 5 --probe --probe-windows 16 --ckpt-every 25 --resume)
        methods=${METHODS:-ddp upgrad gradvac mgda-l2} ;;
    gpu)
        # One GPU, ~10 minutes for the grid (estimated, not measured): every block and the
        # embeddings trained, in bf16 autocast where the GPU has bf16 (--dtype auto), 300 steps
        # of 8 x 256 tokens per language. Checkpoints every 100 steps, so a stopped grid resumes.
        lr=1e-4
        config=(--model smollm2-135m --device cuda --train-layers 0 --train-embeddings
            --steps 300 --warmup 30 --batch-size 8 --context 256 --bucket-cap-mb 25
            --eval-bytes 20000 --eval-every 100 --log-every 10 --diag-every 10 --probe
            --ckpt-every 100 --resume)
        methods=${METHODS:-ddp upgrad gradvac mgda-l2} ;;
    *) echo "unknown grid $grid (tiny, tiny-adapters, smollm2-long, gpu, smollm2, tiny-why)" >&2
        exit 2 ;;
esac
read -ra user_extra <<<"${EXTRA:-}"
scaled() { awk -v lr="$lr" -v f="$1" 'BEGIN { printf "%.6g", lr * f }'; }
for seed in $seeds; do for method in $methods; do
    dir=$out/$method-s$seed
    [[ -f $dir/summary.json ]] && continue
    weighting=${method%%-*}
    extra=(--lr "$lr")
    for variant in $(tr - ' ' <<<"${method#"$weighting"}"); do
        case $variant in
            global | parameter)
                [[ $weighting == ddp ]] && { echo "$method: ddp has no granularity" >&2; exit 2; }
                extra+=(--granularity "$variant") ;;
            l2)
                [[ $weighting == mgda ]] || { echo "$method: l2 is for mgda" >&2; exit 2; }
                extra+=(--mgda-normalization l2) ;;
            lr3) extra+=(--lr "$(scaled 3)") ;;
            lrjitter) extra+=(--lr "$(scaled 1.001)") ;;  # how far a nudge carries
            sketch) extra+=(--protocol sketch) ;;  # the default sketch_size, 4096
            sketch[0-9]*) extra+=(--protocol sketch --sketch-size "${variant#sketch}") ;;
            *) echo "unknown variant $variant in $method" >&2; exit 2 ;;
        esac
    done
    # The pretrained model's step-0 evaluation is the same in every run: do it once.
    [[ $grid =~ ^(smollm2|gpu) && "$method $seed" != "ddp 1" ]] && extra+=(--no-eval-start)
    echo "== $grid $method seed $seed -> $dir"
    nice -n 10 "$python" scripts/finetune_multilingual.py "${common[@]}" "${config[@]}" \
        "${extra[@]}" ${user_extra[@]+"${user_extra[@]}"} --weighting "$weighting" --seed "$seed" \
        --out "$dir" >>"$dir.log" 2>&1 || { echo "failed: see $dir.log" >&2; exit 1; }
    tail -n 3 "$dir.log"
done; done
