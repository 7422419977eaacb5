"""Run a function on R real processes joined by a process group, with a hard timeout.

Each process initialises gloo (or NCCL) through a FileStore in a fresh directory (no ports to
collide), runs ``fn(rank, world_size, *args)``, and saves its return value; the parent loads every
rank's result. A rank that raises fails the test with its traceback; ranks still running at the
deadline are killed, so a hang can never stall the suite.

Starting R processes (each imports torch) costs seconds, far more than most checks, so tests share
launches: :func:`shared_spawn` gives the launch of R processes that many tasks, of many test
modules, run in one after the other (see :class:`SharedSpawn`).
"""

import datetime
import gc
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
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
    watchdog: Callable[[], str | None] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return every result.

    ``fn`` must be a module-level function (it is pickled into spawned processes). With
    ``backend="nccl"`` rank ``r`` uses ``cuda:r``. ``collective_timeout`` is the default group's
    timeout: a hang there fails as an error of the rank after that long. ``watchdog``, called
    every second while the processes run, ends them early with its message as the timeout error.
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
                if watchdog is not None and (late := watchdog()) is not None:
                    raise TimeoutError(late)
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


#: What a task that raised returns instead of its result: ``{TASK_ERROR: traceback}``.
TASK_ERROR = "task_error"


def run_tasks(rank: int, world_size: int, tasks: Sequence[bytes], progress_dir: str) -> list[Any]:
    """Every task, a pickled ``(fn, args)``, in turn: ``fn(rank, world_size, *args)``, each from
    torch's initial random state and with its own copy of its arguments (as in a fresh process);
    a task that raises gives ``{TASK_ERROR: traceback}`` and the next one runs. Writes the index of
    the running task and when it started to ``progress_dir`` (for the parent's watchdog)."""
    seed = torch.initial_seed()
    results = []
    progress = Path(progress_dir) / f"rank{rank}"
    for index, task in enumerate(tasks):
        progress.with_suffix(".new").write_text(f"{index} {time.time()}")
        os.replace(progress.with_suffix(".new"), progress)
        torch.manual_seed(seed)
        try:
            fn, args = pickle.loads(task)
            results.append(fn(rank, world_size, *args))
        except Exception:
            results.append({TASK_ERROR: traceback.format_exc()})
        gc.collect()  # free what the task left (DDP reducers, worker threads) while the group lives
    return results


class Task:
    """One function of a :class:`SharedSpawn`; :meth:`results` gives what every rank returned."""

    def __init__(
        self, spawn: "SharedSpawn", fn: Callable[..., Any], args: tuple[Any, ...], timeout: float
    ) -> None:
        self.spawn, self.fn, self.args, self.timeout = spawn, fn, args, timeout
        self.per_rank: list[Any] | None = None
        self.failure: BaseException | None = None

    @property
    def name(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__name__}"

    def results(self) -> list[Any]:
        """Per rank, what ``fn(rank, world_size, *args)`` returned (the launch runs on first use).
        Fails with the task's traceback if it raised on some rank."""
        if self.per_rank is None and self.failure is None:
            self.spawn.launch()
        if self.failure is not None:
            message = f"{self.name}: its launch failed: {self.failure}"
            raise AssertionError(message) from self.failure
        assert self.per_rank is not None
        errors = [
            f"--- rank {rank} ---\n{result[TASK_ERROR]}"
            for rank, result in enumerate(self.per_rank)
            if isinstance(result, dict) and TASK_ERROR in result
        ]
        if errors:
            raise AssertionError(f"{self.name} failed on some rank:\n" + "\n".join(errors))
        return self.per_rank


class SharedSpawn:
    """Tasks that share one launch of ``world_size`` processes (gloo).

    Test modules add their tasks when they are imported, that is at collection, and read the
    results in their tests: the first test that asks launches the processes once for every task
    added and not yet run (so running one test module runs only its own tasks). In every process
    the tasks run in the order they were added, each from torch's initial random state; a task that
    raises fails the tests reading its result, with its traceback, and the others go on; a task
    that runs past its ``timeout`` ends the launch and fails every test reading it. A task
    must leave the process as it found it (undo its patches) and must not rely on being the first
    in its process: a check about the process's own history gets a :func:`run_distributed` of its
    own. With ``after``, the pending tasks of that launch run first (tasks that need another
    launch's files, or other processes than another launch's).
    """

    def __init__(self, world_size: int, after: "SharedSpawn | None" = None) -> None:
        self.world_size = world_size
        self.after = after
        self.pending: list[Task] = []

    def add(self, fn: Callable[..., Any], *args: Any, timeout: float = 120.0) -> Task:
        """Add ``fn(rank, world_size, *args)`` (a module-level function, as for
        :func:`run_distributed`), allowed ``timeout`` seconds on every rank."""
        task = Task(self, fn, args, timeout)
        self.pending.append(task)
        return task

    def launch(self) -> None:
        """Run every pending task in one launch of the processes."""
        if self.after is not None and self.after.pending:
            self.after.launch()
        tasks, self.pending = self.pending, []
        with tempfile.TemporaryDirectory(prefix="bucketmoo-progress-") as progress:

            def running() -> dict[str, tuple[Task, float]]:
                """Per rank: the task it runs and since when."""
                now = {}
                for path in sorted(Path(progress).glob("rank*[0-9]")):
                    index, started = path.read_text().split()
                    now[path.name] = (tasks[int(index)], float(started))
                return now

            def watchdog() -> str | None:
                for rank, (task, started) in running().items():
                    if time.time() - started > task.timeout:
                        return f"{task.name} ran over its {task.timeout:.0f} s on {rank}"
                return None

            try:
                per_rank = run_distributed(
                    self.world_size,
                    run_tasks,
                    [pickle.dumps((task.fn, task.args)) for task in tasks],
                    progress,
                    timeout=60.0 + sum(task.timeout for task in tasks),  # with start-up
                    watchdog=watchdog,
                )
            except (AssertionError, TimeoutError) as error:
                at = {rank: task.name for rank, (task, _) in running().items()}
                failure = type(error)(f"{error}\n(the task each rank was running: {at})")
                for task in tasks:
                    task.failure = failure
                return
        for index, task in enumerate(tasks):
            task.per_rank = [results[index] for results in per_rank]


_SHARED: dict[tuple[int, bool], SharedSpawn] = {}


def shared_spawn(world_size: int, second: bool = False) -> SharedSpawn:
    """The launch of ``world_size`` processes that the suite's tasks share; with ``second``, the
    one after it (other processes: checks that compare two launches, or resume from the first)."""
    if (world_size, second) not in _SHARED:
        after = shared_spawn(world_size) if second else None
        _SHARED[world_size, second] = SharedSpawn(world_size, after)
    return _SHARED[world_size, second]
