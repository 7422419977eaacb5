"""Run a function on R real processes joined by a process group, with a hard timeout.

Each process initialises gloo (or NCCL) through a FileStore in a fresh directory (no ports to
collide), runs ``fn(rank, world_size, *args)``, and saves its return value; the parent loads every
rank's result. A rank that raises fails the test with its traceback; ranks still running at the
deadline are killed, so a hang can never stall the suite.
"""

import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _worker(
    rank: int,
    world_size: int,
    backend: str,
    store_dir: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    collective_timeout: datetime.timedelta = COLLECTIVE_TIMEOUT,
    faulty: bool = False,
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    out = Path(store_dir)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{out / 'store'}",
            rank=rank,
            world_size=world_size,
            timeout=collective_timeout,
        )
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"partial{rank}.pt")
        os.replace(out / f"partial{rank}.pt", out / f"result{rank}.pt")  # appears complete
        if faulty:
            # Peers may be dead: no barrier, and no destructors that talk to them.
            os._exit(0)
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            # Without a barrier, a gloo worker thread can still hold the last collective's tensors
            # at interpreter shutdown and abort the process (torch 2.13; pytorch PR #179291).
            dist.barrier()
            dist.destroy_process_group()


def run_distributed(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 180.0,
    backend: str = "gloo",
    collective_timeout: datetime.timedelta = COLLECTIVE_TIMEOUT,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return every result.

    ``fn`` must be a module-level function (it is pickled into spawned processes). With
    ``backend="nccl"`` rank ``r`` uses ``cuda:r``. ``collective_timeout`` is the default group's
    timeout: a hang there fails as an error of the rank after that long.
    """
    with tempfile.TemporaryDirectory(prefix="bucketmoo-") as store_dir:
        context = mp.start_processes(
            _worker,
            args=(world_size, backend, store_dir, fn, args, collective_timeout),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        end = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, min(1.0, end - time.monotonic()))):
                if time.monotonic() > end:
                    raise TimeoutError(
                        f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s"
                    )
        except mp.ProcessRaisedException:
            errors = sorted(Path(store_dir).glob("error*.txt"))
            details = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors)
            raise AssertionError(f"{fn.__name__} failed on some rank:\n{details}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [
            torch.load(Path(store_dir) / f"result{rank}.pt", weights_only=True)
            for rank in range(world_size)
        ]


def run_with_faults(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    survivors: set[int],
    collective_timeout: float,
    timeout: float = 180.0,
) -> tuple[dict[int, Any], float]:
    """Run ``fn(rank, world_size, *args)`` where the ranks outside ``survivors`` die or stall on
    purpose; the collectives time out after ``collective_timeout`` seconds.

    Returns each survivor's result and the seconds until the last survivor returned (measured
    from the start of the processes, so it includes start-up); the other ranks are then killed.
    """
    with tempfile.TemporaryDirectory(prefix="bucketmoo-") as store_dir:
        out = Path(store_dir)
        timeouts = datetime.timedelta(seconds=collective_timeout)
        context = mp.start_processes(
            _worker,
            args=(world_size, "gloo", store_dir, fn, args, timeouts, True),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        start = time.monotonic()
        try:
            while not all((out / f"result{r}.pt").exists() for r in survivors):
                if any(out.glob("error*.txt")) or time.monotonic() - start > timeout:
                    break
                time.sleep(0.1)
            elapsed = time.monotonic() - start
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        errors = sorted(out.glob("error*.txt"))
        if errors:
            details = "\n".join(f"--- {e.stem} ---\n{e.read_text()}" for e in errors)
            raise AssertionError(f"{fn.__name__} raised on some rank:\n{details}")
        missing = [r for r in survivors if not (out / f"result{r}.pt").exists()]
        if missing:
            raise TimeoutError(f"ranks {missing} of {fn.__name__} hung for {timeout:.0f} s")
        return {r: torch.load(out / f"result{r}.pt", weights_only=True) for r in survivors}, elapsed
