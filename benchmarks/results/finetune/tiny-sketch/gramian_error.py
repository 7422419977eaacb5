"""Sketch error on the tiny grid's real gradients: per bucket, the k=4096 sketch's Gramian against
the exact one over many sketch seeds (steps), and what MGDA does with it.

    python benchmarks/results/finetune/tiny-sketch/gramian_error.py [CKPT]

CKPT: a ``finetune_multilingual.py --ckpt-every`` checkpoint of the tiny grid's model (default:
the initialisation of seed 1). Gradients of 3 batches per language; every bucket longer than k
sketched with the seeds of steps 0-99, as the hook would over 100 steps.
"""

import runpy
import statistics
import sys
from pathlib import Path

import torch

from bucketmoo_hooks.reference import sketch_gramian
from bucketmoo_hooks.single_device import ddp_bucket_partition
from bucketmoo_hooks.weightings import get_weighting

ROOT = Path(__file__).resolve().parents[4]
ns = runpy.run_path(str(ROOT / "scripts/finetune_multilingual.py"), run_name="lib")
TINY = "--model tiny --n-layer 3 --d-model 64 --n-head 4 --bucket-cap-mb 0.05 --seed 1"
args = ns["parse_args"](
    ["--engine", "single", "--data", "gnome", "--languages", "de,fr,ru,ko", *TINY.split()]
)
torch.manual_seed(1)
torch.set_num_threads(1)
model, codec = ns["build_model"](args)
if len(sys.argv) > 1:
    model.load_state_dict(torch.load(sys.argv[1], weights_only=True)["model"], strict=False)
texts = ns["load_texts"](args)
langs = args.languages
train = {c: torch.tensor(codec.encode("\n".join(texts[c]["train"]))) for c in langs}
params = [p for p in model.parameters() if p.requires_grad]
buckets = ddp_bucket_partition(params, args.bucket_cap_mb)
order = [i for b in buckets for i in b]
lengths = [sum(params[i].numel() for i in b) for b in buckets]
mgda = get_weighting("mgda")
K, SEEDS, BATCHES = 4096, 100, 3
generator = torch.Generator().manual_seed(7)
rows = {"norm2": [], "cos": [], "w_l1": [], "w_bias": [], "argmax": [], "d_hat": [], "d_true": []}
for _ in range(BATCHES):
    grads = []
    for c in langs:
        x, y = ns["get_batch"](train[c], 16, 64, codec.bos, generator)
        model.zero_grad()
        model(x, y)[1].backward()
        grads.append(torch.cat([params[i].grad.flatten() for i in order]))
    for b, a in enumerate(torch.split(torch.stack(grads), lengths, dim=1)):
        if a.shape[1] <= K:
            continue
        exact = a.double() @ a.double().T
        w = mgda(exact.float())
        d = exact.diagonal().sqrt()
        iu = torch.triu_indices(4, 4, 1)
        ws = []
        for step in range(SEEDS):
            g = sketch_gramian(a, K, step=step, bucket=b).double()
            rows["norm2"] += (g.diagonal() / exact.diagonal() - 1).tolist()
            cos_hat = g / torch.outer(g.diagonal().sqrt(), g.diagonal().sqrt())
            cos = exact / torch.outer(d, d)
            rows["cos"] += (cos_hat - cos)[iu[0], iu[1]].tolist()
            ws.append(mgda(g.float()))
            rows["w_l1"].append((ws[-1] - w).abs().sum().item())
            rows["argmax"].append(int(ws[-1].argmax() == w.argmax()))
            # ‖d‖ over the exact min-norm: as the diagnostics report it (ŵᵀĜŵ), and in truth.
            exact_norm = (w.double() @ exact @ w.double()).sqrt()
            w_hat = ws[-1].double()
            rows["d_hat"].append(((w_hat @ g @ w_hat).sqrt() / exact_norm).item())
            rows["d_true"].append(((w_hat @ exact @ w_hat).sqrt() / exact_norm).item())
        rows["w_bias"].append((torch.stack(ws).mean(0) - w).tolist())
sd = statistics.pstdev
print(f"k={K} (fold width 4093), {BATCHES} batches x 10 sketched buckets x {SEEDS} seeds")
print(
    f"squared norm, relative error: sd {sd(rows['norm2']):.4f} "
    f"(the module docstring's bound √(2/p): {(2 / 4093) ** 0.5:.4f})"
)
print(
    f"pair cosine, absolute error: sd {sd(rows['cos']):.4f}, max {max(map(abs, rows['cos'])):.3f}"
)
print(
    f"MGDA weights, |w_hat - w|_1: mean {statistics.fmean(rows['w_l1']):.4f}, "
    f"p95 {sorted(rows['w_l1'])[int(0.95 * len(rows['w_l1']))]:.4f}; same largest weight "
    f"{statistics.fmean(rows['argmax']):.1%}"
)
print(
    "MGDA ‖d‖ over the exact min-norm: as Ĝ reports it "
    f"{statistics.fmean(rows['d_hat']):.4f} ± {sd(rows['d_hat']):.4f}, in truth "
    f"{statistics.fmean(rows['d_true']):.4f} ± {sd(rows['d_true']):.4f}"
)
bias = [statistics.fmean(col) for col in zip(*rows["w_bias"], strict=True)]
print(
    "MGDA weights, mean over seeds minus exact, per language: "
    + "  ".join(f"{c} {v:+.4f}" for c, v in zip(langs, bias, strict=True))
)
