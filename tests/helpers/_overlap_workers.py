"""Functions run on every rank by the overlap tests (module level, so spawned processes import
them)."""

import gc
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from _ddp_workers import batch, make_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bucketmoo_hooks import BucketMOOState, bucket_moo_hook, install_bucket_moo
from bucketmoo_hooks.weightings import MGDA, Weighting, WeightingContext


def overlap_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "bucketmoo-overlap"]


def overlap_on_and_off(rank: int, world_size: int, granularity: str) -> dict[str, Any]:
    """The same training with and without overlap; every bucket's output and the parameters."""
    runs: dict[str, Any] = {}
    for overlap in (True, False):
        model = make_model((31, 17), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.001, find_unused_parameters=True)
        state = BucketMOOState(
            ["en", "de", "en", "ja"][:world_size], granularity=granularity, overlap=overlap
        )
        install_bucket_moo(ddp, state)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        ledgers = []
        for step in range(4):
            x, target = batch(rank, step, 0, torch.float32)
            nn.functional.mse_loss(ddp(x), target).backward()
            ledgers.append([dict(t.sent) for t in state.ledger.last_step])
            optimizer.step()
            optimizer.zero_grad()
        runs[str(overlap)] = {
            "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "iter": state.iter,
            "ledgers": ledgers,
            "held_bytes": state.held_bytes,
            "workspace_bytes": state._runtime.workspace.nbytes,
            "largest_bucket_bytes": max(t.numel * t.element_size for t in state.ledger.last_step),
        }
    return runs


class SlowMean(Weighting):
    """Equal weights after ``delay`` seconds: a bucket whose reduction takes a known time."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def forward(self, gramian: torch.Tensor, context: WeightingContext | None) -> torch.Tensor:
        time.sleep(self.delay)
        return torch.full_like(gramian[0], 1.0 / gramian.shape[0])


def hook_body_times(rank: int, world_size: int, delay: float) -> dict[str, list[float]]:
    """Per overlap setting: how long each hook call blocked the autograd thread."""
    times: dict[str, list[float]] = {}
    for overlap in (True, False):
        model = make_model((31, 17), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
        state = BucketMOOState(weighting=SlowMean(delay), overlap=overlap)
        blocked: list[float] = []

        def timed(
            state: BucketMOOState, bucket: dist.GradBucket
        ) -> torch.futures.Future[torch.Tensor]:
            start = time.perf_counter()
            future = bucket_moo_hook(state, bucket)
            blocked.append(time.perf_counter() - start)  # noqa: B023 - used before the loop moves on
            return future

        ddp.register_comm_hook(state, timed)
        for step in range(2):
            x, target = batch(rank, step, 0, torch.float32)
            nn.functional.mse_loss(ddp(x), target).backward()
        times[str(overlap)] = blocked
    return times


class Failing(Weighting):
    """MGDA, except once: on bucket ``bad`` of step 1 (any bucket if -1) it raises."""

    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.failed = False
        self.mgda = MGDA()

    def forward(self, gramian: torch.Tensor, context: WeightingContext | None) -> torch.Tensor:
        assert context is not None
        if not self.failed and context.step == 1 and self.bad in (-1, context.bucket):
            self.failed = True
            raise ValueError(f"weighting broke on bucket {context.bucket}")
        return self.mgda(gramian, context)


def worker_error(rank: int, world_size: int, granularity: str, bad: int) -> dict[str, Any]:
    """An error on the worker thread reaches backward() on every rank; training then goes on."""
    model = make_model((31, 17), torch.float32)
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
    state = BucketMOOState(weighting=Failing(bad), granularity=granularity)
    ddp.register_comm_hook(state, bucket_moo_hook)
    errors = []
    for step in range(3):
        x, target = batch(rank, step, 0, torch.float32)
        try:
            nn.functional.mse_loss(ddp(x), target).backward()
        except RuntimeError as error:
            errors.append(str(error))
    # A DDP reducer whose backward was interrupted can abort the process if destroyed after the
    # process group; free it while the group lives (as _ddp_workers.disagreeing_states).
    del ddp
    gc.collect()
    return {"errors": errors, "iter": state.iter}


def worker_shutdown(rank: int, world_size: int) -> dict[str, Any]:
    """The worker thread starts with the first bucket and stops on close() and on collection."""
    seen = {"before": len(overlap_threads())}
    model = make_model((7,), torch.float32)
    ddp = DistributedDataParallel(model)
    state = BucketMOOState()
    install_bucket_moo(ddp, state)
    x, target = batch(rank, 0, 0, torch.float32)
    nn.functional.mse_loss(ddp(x), target).backward()
    seen["training"] = len(overlap_threads())
    # The worker's copy of the group fails a stalled peer as soon as the user's group would.
    timeouts = [
        g._get_backend(torch.device("cpu")).options._timeout
        for g in (dist.group.WORLD, state._runtime._worker.group)
    ]
    seen["same_timeout"] = timeouts[0] == timeouts[1] != dist.default_pg_timeout
    state.close()
    seen["closed"] = len(overlap_threads())
    nn.functional.mse_loss(ddp(x), target).backward()  # a new thread, same copy of the group
    seen["restarted"] = len(overlap_threads())
    del ddp, state
    gc.collect()
    deadline = time.monotonic() + 10
    while overlap_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    seen["collected"] = len(overlap_threads())
    return seen


def early_exchange(rank: int, world_size: int, delay: float) -> dict[str, Any]:
    """The step's objective exchange starts before backward: rank 1 reaches backward ``delay``
    seconds after rank 0; how long rank 0's bucket 0 waited for the exchange, per step.

    ``installed``: registered by ``install_bucket_moo`` (the forward pre-hook starts it);
    ``set_objective``: likewise, with ``set_objective`` called every step, after the forward
    (the same objective each time: allowed); ``plain``: ``register_comm_hook`` without the
    installer, so the exchange runs at bucket 0 and rank 0 waits for rank 1. Then the checks
    still raise on every rank: a rank that changed its objective after the exchange started
    (reported at the next step), and ranks at different steps.
    """
    waited: dict[str, list[float]] = {}
    for setup in ("installed", "set_objective", "plain"):
        model = make_model((31, 17), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
        state = BucketMOOState(["en", "de"][:world_size])
        if setup == "plain":
            ddp.register_comm_hook(state, bucket_moo_hook)
        else:
            install_bucket_moo(ddp, state)
        waited[setup] = []
        for step in range(4):
            x, target = batch(rank, step, 0, torch.float32)
            loss = nn.functional.mse_loss(ddp(x), target)
            if setup == "set_objective":
                state.set_objective(("en", "de")[rank])
            if rank == 1:
                time.sleep(delay)
            loss.backward()
            waited[setup].append(state._steps.waited_s)
    errors: dict[str, str] = {}
    for case in ("late", "steps"):
        model = make_model((31, 17), torch.float32)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.001)
        state = BucketMOOState()
        install_bucket_moo(ddp, state)
        for step in range(4):
            if case == "late" and step == 2:
                state.set_objective("first")  # before the forward: this step's objective
            elif case == "steps" and step == 2 and rank == 1:
                state.iter += 1
            x, target = batch(rank, step, 0, torch.float32)
            loss = nn.functional.mse_loss(ddp(x), target)
            if case == "late" and step == 2:
                state.set_objective("second")  # after the forward: the exchange has started
            try:
                loss.backward()
            except RuntimeError as error:
                errors[case] = f"step {step}: {error}"
                break
        del ddp  # as worker_error: free the interrupted reducer while the group lives
        gc.collect()
    return {"waited": waited, "errors": errors}
