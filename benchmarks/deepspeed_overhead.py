"""Step time and bytes of DeepSpeed ZeRO-1/2/3 with and without bucket-MOO, side by side.

Run under torchrun (gloo on CPU; DeepSpeed's CPU accelerator)::

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node=2 \
        benchmarks/deepspeed_overhead.py --out benchmarks/results/deepspeed_overhead_cpu.json

Every rank trains its own 'language' (comm_overhead.py's transformer and data). For each ZeRO
stage and method (``plain``: DeepSpeed alone; ``mgda``: bucket-MOO with the shard protocol;
``sketch``: with ``protocol="sketch"``), the methods alternate over ``--rounds`` rounds of
``--steps`` timed steps (after ``--warmup`` untimed ones), so that a drift of the machine's load
hits them alike; the table gives each method's median step time over its rounds and its ratio
to ``plain``, and the bytes every collective sent per step (all of DeepSpeed's, the parameter
all-gathers of ZeRO-3 included), counted from Python. Rank 0 writes the JSON and a markdown
table beside it.
"""

import argparse
import datetime
import importlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from comm_overhead import (
    CollectiveCounter,
    batches,
    cpu_model,
    load_average,
    loss_of,
    make_model,
)
from comm_overhead import Config as ModelConfig

from bucketmoo_hooks import BucketMOOState, install_bucket_moo

METHODS = {
    "plain": None,
    "mgda": {"weighting": "mgda"},
    "sketch": {"weighting": "mgda", "protocol": "sketch"},
}


def ds_config(stage: int, bucket: int, batch: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 0,
        },
        "steps_per_print": 10**9,
    }


def measure(
    stage: int, method: str, args: argparse.Namespace, counter: CollectiveCounter, control: Any
) -> dict[str, Any]:
    """``args.warmup + args.steps`` steps of one engine; this rank's record."""
    import deepspeed

    config = ModelConfig(args.layers, args.d_model, args.context, args.batch, 0, 0, 0.0)
    torch.manual_seed(0)
    model = make_model("gpt", args.layers, args.d_model, args.context)
    engine, *_ = deepspeed.initialize(
        model=model,
        config=ds_config(stage, args.bucket, args.batch),
        model_parameters=model.parameters(),
    )
    state = None
    if METHODS[method] is not None:
        state = BucketMOOState(**METHODS[method])
        install_bucket_moo(engine, state)
    data = batches(dist.get_rank(), config, torch.device("cpu"))
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            counter.reset()
        tokens = next(data)
        dist.barrier(group=control)
        start = time.perf_counter()
        engine.backward(loss_of(engine, tokens))
        engine.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    record = {
        "median_step_s": statistics.median(times),
        "sent_per_step": {k: v // args.steps for k, v in counter.sent.items()},
    }
    if state is not None:
        ledger = state.ledger
        record["ledger_per_step"] = ledger.last_step_bytes()
        record["engine_equivalent"] = (
            ledger.last_step_reduce_scatter_bytes()
            if stage == 3
            else ledger.last_step_allreduce_bytes()
        )
        record["buckets"] = len(ledger.last_step)
        state.close()
    engine.destroy()
    return record


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# DeepSpeed ZeRO with and without bucket-MOO (gloo, CPU)",
        "",
        f"- date: {result['date']}; machine: {result['machine']}; load before/after: "
        f"{result['load_before']:.2f}/{result['load_after']:.2f}",
        f"- command: `{result['command']}`",
        f"- model: {result['parameters']:,} parameters; {result['world_size']} ranks; "
        f"reduce_bucket_size {result['bucket']:,} elements; DeepSpeed {result['deepspeed']}, "
        f"torch {result['torch']}",
        "",
        "| stage | method | median step (s) | ratio to plain | bytes/step (all collectives) "
        "| hook's bytes / engine's own for its buckets |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, methods in result["stages"].items():
        plain = methods["plain"]["median_step_s"]
        for method, record in methods.items():
            sent = sum(record["sent_per_step"].values())
            own = record.get("ledger_per_step")
            versus = "—" if own is None else f"{own / record['engine_equivalent']:.3f}"
            lines.append(
                f"| {stage} | {method} | {record['median_step_s']:.3f} | "
                f"{record['median_step_s'] / plain:.3f} | {sent:,} | {versus} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--bucket", type=int, default=6_250_000, help="elements (25 MB fp32)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # DeepSpeed's shared-memory op compiles for minutes on a CPU; gloo serves without it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    dist.init_process_group("gloo")
    control = dist.new_group(backend="gloo")
    counter = CollectiveCounter(ignore=control)
    counter.install()
    load_before = load_average()
    stages = [int(s) for s in args.stages.split(",")]
    methods = args.methods.split(",")
    rounds: dict[int, dict[str, list[dict]]] = {s: {m: [] for m in methods} for s in stages}
    for _ in range(args.rounds):
        for stage in stages:
            for method in methods:
                rounds[stage][method].append(measure(stage, method, args, counter, control))
    if dist.get_rank() == 0:
        import deepspeed

        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_model()}, {torch.get_num_threads()} thread(s) per rank",
            "command": "python -m torch.distributed.run --standalone "
            f"--nproc-per-node={dist.get_world_size()} benchmarks/deepspeed_overhead.py "
            f"--stages={args.stages} --methods={args.methods} --layers={args.layers} "
            f"--steps={args.steps} --rounds={args.rounds} --out={args.out}",
            "load_before": load_before,
            "load_after": load_average(),
            "world_size": dist.get_world_size(),
            "parameters": sum(
                p.numel()
                for p in make_model("gpt", args.layers, args.d_model, args.context).parameters()
            ),
            "bucket": args.bucket,
            "deepspeed": deepspeed.__version__,
            "torch": torch.__version__,
            "stages": {
                stage: {
                    method: {
                        **records[-1],
                        "median_step_s": statistics.median(r["median_step_s"] for r in records),
                        "rounds_s": [r["median_step_s"] for r in records],
                    }
                    for method, records in by_method.items()
                }
                for stage, by_method in rounds.items()
            },
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
        print(markdown(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
