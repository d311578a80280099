"""One queue per loaded model: the generations of every study in the process share ``generate`` calls.

Why not transformers' own continuous batching (``model.init_continuous_batching``,
``transformers.generation.continuous_batching``, transformers 5.25)? Its requests are token ids only
(``add_request(input_ids, ...)``) and its forward pass gets only the paged-attention batch
(``input_ids``, ``position_ids``, cumulative lengths): there is no way to pass ``pixel_values``, so
a vision-language model would see its image placeholder tokens as text and never the image.
``transformers serve`` says so itself ("Only LLMs support continuous batching. Falling back to
sequential generation."). Engines that do batch images continuously (vLLM, SGLang) are the server
path (:mod:`inference.vlm.server`).

So in-process mednode does the smallest honest thing: every job thread of a worker process hands its
prompt units to the model's :class:`GenerationQueue`; one thread runs ``generate`` over whatever units
are waiting, up to ``max_batch`` of them with the same generation settings (the token budget; decoding
is greedy for all), left padded, and hands each job its own results. A unit's greedy output does not
depend on what it was batched with (checked in ``tests/unit/inference/test_batching.py``).

Units of a more urgent job (a higher ``priority``: an ask, a STAT rule) go into the next call first,
filled up with waiting units of other jobs. A batch is taken as soon as the thread is free.

Units that arrive while ``generate`` runs: with room in the running call (fewer than ``max_batch``
units, same settings), the call is *restarted* with them, as long as it is early in its decoding
(``generate`` asks :meth:`GenerationQueue.should_restart` between decoding steps; the runtime asks
only in the first quarter of the token budget, so at most that much work is thrown away). Without
this, studies arriving a second apart were run as a batch of one followed by a batch of the rest:
a 256-token report from one study held back the seven that arrived just after it for the whole
call (the convoy measured in docs/BENCHMARKS.md). Greedy outputs do not depend on the batch, so a
restarted unit gives the same answer. Otherwise units wait for the next call (a long report still
holds a short question back until the call ends; a full call is never restarted).

CUDA out of memory: the batch is split in halves and each half retried (cache emptied first), down to
one unit; a unit that does not fit alone raises :class:`inference.errors.ModelOutOfMemoryError`, a
transient error (the job is retried later).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from inference.errors import ModelOutOfMemoryError

logger = logging.getLogger(__name__)

U = TypeVar("U")
R = TypeVar("R")

#: ``observe(units, submitters, seconds)``: called after each ``generate`` call that succeeded.
BatchObserver = Callable[[int, int, float], None]


class Restart(Exception):
    """Raised by a ``generate`` function that stopped early because :meth:`GenerationQueue.should_restart`
    said units are waiting to join the call: the queue runs them again together with those units."""


@dataclass
class _Pending(Generic[U, R]):
    unit: U
    key: Hashable
    submitter: int
    priority: int
    future: Future[R] = field(default_factory=Future)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _free_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GenerationQueue(Generic[U, R]):
    """Runs ``generate`` for units from any thread, batching those that wait together.

    Parameters
    ----------
    generate : callable
        Runs a batch of units and returns one result per unit, in order.
    key : callable
        The generation settings of a unit; only units with equal keys share a call.
    max_batch : int
        At most this many units per call.
    observe : callable, optional
        Told the size of each call, how many submitters (jobs) it served and how long it took.
    """

    def __init__(self, generate: Callable[[Sequence[U]], Sequence[R]], *, key: Callable[[U], Hashable],
                 max_batch: int, observe: BatchObserver | None = None, name: str = "vlm") -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
        self._generate, self._key, self.max_batch, self.observe = generate, key, max_batch, observe
        self._pending: list[_Pending[U, R]] = []
        self._cond = threading.Condition()
        self._next_submitter = 0
        self._name = name
        self._thread: threading.Thread | None = None
        self._running: list[_Pending[U, R]] = []
        self._joiners = False
        self.restarts = 0

    def should_restart(self) -> bool:
        """True when units that could join the running call are waiting (there is room in it, and
        their settings are the same): ``generate`` may then stop and raise :class:`Restart`."""
        return self._joiners and bool(self._running)

    def pending(self) -> int:
        """Units waiting for a ``generate`` call (not counting the one running)."""
        with self._cond:
            return len(self._pending)

    def run(self, units: Sequence[U], *, priority: int = 0) -> list[R]:
        """Queue ``units`` (one caller's, in order), wait for them, return their results in order.

        Units of a higher ``priority`` go into calls before those of a lower one.

        Raises
        ------
        ModelOutOfMemoryError
            A unit did not fit in GPU memory even alone.
        Exception
            Whatever ``generate`` raised for one of these units run alone.
        """
        if not units:
            return []
        with self._cond:
            submitter = self._next_submitter
            self._next_submitter += 1
            items = [_Pending[U, R](u, self._key(u), submitter, priority) for u in units]
            self._pending.extend(items)
            running = self._running
            if running and len(running) < self.max_batch and items[0].key == running[0].key:
                self._joiners = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=f"{self._name}-generate",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return [item.future.result() for item in items]

    def _take(self) -> list[_Pending[U, R]]:
        """The first waiting unit of the highest priority, and the waiting units with its key, up to
        ``max_batch``: by priority, then first come (so one caller's units are chunked exactly as a
        sequential run would)."""
        with self._cond:
            while not self._pending:
                self._cond.wait()
            ordered = sorted(self._pending, key=lambda p: -p.priority)  # stable: FIFO within one
            key = ordered[0].key
            batch = [p for p in ordered if p.key == key][:self.max_batch]
            taken = {id(p) for p in batch}
            self._pending = [p for p in self._pending if id(p) not in taken]
            self._running, self._joiners = batch, False
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            try:
                self._run(batch)
            except Restart:
                with self._cond:  # back in front, in their order: the next call takes them first
                    self._pending[:0] = batch
                    self.restarts += 1
                logger.info("generate: restarted %d prompt(s) to let waiting prompts join", len(batch))
            except BaseException as exc:  # noqa: BLE001 (this thread must never die with callers waiting)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                with self._cond:
                    self._running, self._joiners = [], False

    def _run(self, batch: list[_Pending[U, R]]) -> None:
        started = time.perf_counter()
        try:
            results = self._generate([p.unit for p in batch])
        except Restart:
            if batch is not self._running:
                raise RuntimeError("generate raised Restart in a retry of part of a call, where "
                                   "should_restart() is always False") from None
            raise
        except Exception as exc:  # noqa: BLE001 (boundary: the error goes to the job that owns the unit)
            self._running = []  # the halves and singles below are never restarted
            if _is_out_of_memory(exc):
                _free_cached_memory()
                if len(batch) == 1:
                    batch[0].future.set_exception(ModelOutOfMemoryError(
                        "the model ran out of GPU memory on one prompt alone (the batch was halved down "
                        "to 1); the job will be retried — free GPU memory (fewer worker processes per "
                        "GPU, a smaller models.vlm.batch_size or slices_per_series) if it keeps "
                        "happening"))
                    return
                half = (len(batch) + 1) // 2
                logger.warning("CUDA out of memory with %d prompts in one generate call; retrying "
                               "as %d and %d", len(batch), half, len(batch) - half)
                self._run(batch[:half])
                self._run(batch[half:])
                return
            if len({p.submitter for p in batch}) > 1:
                # a failure belongs to one job's unit: run each alone so others are not failed for it
                for item in batch:
                    self._run([item])
                return
            for item in batch:
                item.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        jobs = len({p.submitter for p in batch})
        logger.info("generate: %d prompt(s) from %d job(s) in %.2f s", len(batch), jobs, elapsed)
        if self.observe is not None:
            self.observe(len(batch), jobs, elapsed)
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)
