"""Overlap for gloo/CPU buckets: one thread per copy of a process group reduces the buckets of
every hook state over its ranks, in hand-over order.

On gloo every ``work.wait()`` blocks the calling thread. In the hook body that thread is
autograd's, so backward stalls while the bucket's all-to-all and Gramian all-reduce run; DDP's
own ``allreduce_hook`` returns at once instead. The hook therefore hands each bucket to this
worker and returns a :class:`torch.futures.Future` that the worker completes. One thread, first
in first out, keeps the collective order identical on all ranks. Its collectives run on a
process group of their own (``_groups``), so they cannot interleave with the collectives that DDP
itself issues on the autograd thread (e.g. the unused-parameter map after the last bucket).
"""

import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long shutdown waits for a bucket in flight; a collective stuck on a dead peer must not hang
# interpreter exit (the thread is a daemon and dies with the process).
_JOIN_TIMEOUT_S = 5.0


class BucketHookError(RuntimeError):
    """A bucket reduced on the overlap worker failed; ``__cause__`` is the original error.

    DDP re-raises a failed future from ``backward()`` as a ``RuntimeError`` whose message is this
    one, so the message names the bucket, the step and the original exception.
    """


@dataclass(frozen=True, slots=True)
class _Job:
    step: int
    index: int
    opens_step: bool  # the first bucket of a backward pass
    run: Callable[[], torch.futures.Future[torch.Tensor]]
    result: torch.futures.Future[torch.Tensor]


class BucketWorker:
    """A daemon thread that runs bucket reductions in submission order.

    Attributes:
        group: The process group the worker's collectives use (a copy of the hook's group).
    """

    __slots__ = ("__weakref__", "_finalizer", "_jobs", "_thread", "group")

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # The thread holds the queue only, never the worker or the hook state, so both can be
        # garbage-collected; the finalizer (also run at interpreter exit) then stops it.
        self._thread = threading.Thread(
            target=_serve, args=(self._jobs,), name="bucketmoo-overlap", daemon=True
        )
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop, self._jobs, self._thread)

    def submit(
        self,
        step: int,
        index: int,
        opens_step: bool,
        run: Callable[[], torch.futures.Future[torch.Tensor]],
    ) -> torch.futures.Future[torch.Tensor]:
        """Queue ``run`` (which issues the bucket's collectives and returns the future of its
        result); returns a future that completes with that result or with a
        :class:`BucketHookError`."""
        outcome: torch.futures.Future = torch.futures.Future()
        self._jobs.put(_Job(step, index, opens_step, run, outcome))
        # The worker sets the outcome (the bucket, or a BucketHookError) as a value; this callback
        # raises the error, which marks the returned future failed for C++ too. (DDP reads a
        # future failed with ``set_exception`` as a value and fails to cast it to a tensor.)
        return outcome.then(unwrap_outcome)

    def close(self) -> None:
        """Stop the thread after the buckets already queued (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def unwrap_outcome(outcome: torch.futures.Future) -> torch.Tensor:
    """``then`` callback: the tensor an outcome future holds, or raise the error it holds."""
    value = outcome.value()
    if isinstance(value, BaseException):
        raise value
    return value


def _stop(jobs: "queue.SimpleQueue[_Job | None]", thread: threading.Thread) -> None:
    jobs.put(None)
    if thread is not threading.current_thread():
        thread.join(_JOIN_TIMEOUT_S)


def _serve(jobs: "queue.SimpleQueue[_Job | None]") -> None:
    # After a bucket fails, the later buckets of its step are not reduced: the ranks' collective
    # sequences may already differ, and a collective that can never match would only time out.
    failed = False
    while (job := jobs.get()) is not None:
        failed = failed and not job.opens_step
        if failed:
            job.result.set_result(
                BucketHookError(
                    f"bucket_moo_hook: bucket {job.index} of step {job.step} was not reduced "
                    "because an earlier bucket of the step failed (see that error)"
                )
            )
            continue
        try:
            # Grad mode is per thread: off here, as in autograd's engine where hooks usually run.
            with torch.no_grad():
                _forward(job.run(), job)
        except BaseException as error:  # handed to backward() through the future
            failed = True
            job.result.set_result(_wrap(error, job.index, job.step))
        del job  # drop the bucket's tensors while waiting for the next one


def _wrap(error: BaseException, index: int, step: int) -> BucketHookError:
    wrapped = BucketHookError(
        f"bucket_moo_hook failed on bucket {index} of step {step}: {type(error).__name__}: {error}"
    )
    wrapped.__cause__ = error
    return wrapped


def _forward(source: torch.futures.Future[torch.Tensor], job: _Job) -> None:
    """Complete ``job.result`` with ``source``'s outcome when it arrives.

    The callback runs on a gloo thread and keeps only the result future and two ints: were it
    to hold the last reference to the process group, the group would be destroyed on its own
    thread, which aborts the process (the destructor joins that thread).
    """
    result, index, step = job.result, job.index, job.step

    def done(finished: torch.futures.Future[torch.Tensor]) -> None:
        try:
            value = finished.value()
        except BaseException as error:
            result.set_result(_wrap(error, index, step))
        else:
            result.set_result(value)

    source.add_done_callback(done)
