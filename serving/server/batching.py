"""Server-side batching of Predict requests, with TF Serving's BatchingParameters.

Concurrent requests for the same version, signature and outputs, whose inputs
agree in every dimension but the first, wait in one queue. A batch thread
takes a queue's requests once they fill `max_batch_size` rows or the oldest
has waited `batch_timeout_micros`, runs them as one batch (padded up to the
next of `allowed_batch_sizes`, when given) and hands each request its rows.
A request larger than `max_batch_size` is refused, as is one arriving when
`max_enqueued_batches` full batches are already waiting.

Beyond TF Serving: a request whose client is gone or whose deadline passed
is dropped before its batch runs, and a batch that fails runs again request
by request, so that one client's bad input (an undecodable file, say) fails
only that client's request.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time

from typing import TYPE_CHECKING

import grpc
import numpy as np

from serving.server.calls import NO_CALL, Call
from serving.server.errors import ServingError, invalid

if TYPE_CHECKING:
    from serving.server.servable import Servable, Signature

log = logging.getLogger(__name__)

# How often a waiting request looks whether its caller is still there.
CALLER_CHECK_SECONDS = 0.25


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """TF Serving's defaults for parameters a BatchingParameters file leaves out."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"batching parameter {name} must be at least 1; got {getattr(self, name)}")
        if self.batch_timeout_micros < 0:
            raise ValueError("batching parameter batch_timeout_micros must not be negative")
        sizes = self.allowed_batch_sizes
        if sizes and (list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size or sizes[0] < 1):
            raise ValueError(f"allowed_batch_sizes must increase and end with max_batch_size "
                             f"({self.max_batch_size}); got {list(sizes)}")

    @classmethod
    def from_proto(cls, parameters) -> BatchingOptions:
        if parameters.pad_variable_length_inputs:
            raise ValueError("pad_variable_length_inputs is not supported by this server")
        values = {}
        for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
            if parameters.HasField(name):
                values[name] = getattr(parameters, name).value
        values["allowed_batch_sizes"] = tuple(parameters.allowed_batch_sizes)
        return cls(**values)


def batch_size(inputs: dict[str, np.ndarray]) -> int:
    """The rows of a request, checked as TF Serving's batching session checks every
    Run of a batching-enabled model: at least one input, each with a first
    dimension, all of the same size."""
    if not inputs:
        raise invalid("Batching Run() must have at least one input tensor")
    if any(array.ndim == 0 for array in inputs.values()):
        raise invalid("Batching Run() input tensors must have at least one dimension")
    sizes = {array.shape[0] for array in inputs.values()}
    if len(sizes) != 1:
        raise invalid("Batching Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


@dataclasses.dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    rows: int
    enqueued: float
    future: concurrent.futures.Future
    call: Call = NO_CALL


@dataclasses.dataclass
class _Queue:
    servable: Servable
    signature: Signature
    outputs: list[str]
    tasks: list[_Task] = dataclasses.field(default_factory=list)
    rows: int = 0  # of its tasks, kept as they come and go

    def __post_init__(self):
        self.rows = sum(task.rows for task in self.tasks)


class Batcher:
    """A `Runner` for ModelServer that merges concurrent requests into batches."""

    def __init__(self, options: BatchingOptions):
        self.options = options
        self._queues: dict[tuple, _Queue] = {}
        self._condition = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()
        # For tests and logs: batches run, the largest, and failed batches run again request by request.
        self.batches_run = 0
        self.largest_batch = 0
        self.batches_split = 0

    def __call__(self, servable: Servable, signature: Signature, inputs: dict[str, np.ndarray],
                 outputs: list[str], call: Call = NO_CALL) -> dict[str, np.ndarray]:
        count = batch_size(inputs)
        if count > self.options.max_batch_size:
            raise invalid(f"Task size {count} is larger than maximum input batch size "
                          f"{self.options.max_batch_size}")
        key = (id(servable), signature.key, tuple(outputs),
               tuple((alias, array.shape[1:], array.dtype.str) for alias, array in sorted(inputs.items())))
        task = _Task(inputs, count, time.monotonic(), concurrent.futures.Future(), call)
        with self._condition:
            if self._closed:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            waiting = sum(queue.rows for queue in self._queues.values())
            if waiting + count > self.options.max_enqueued_batches * self.options.max_batch_size:
                raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                   "The batch scheduling queue to which this task was submitted is full")
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(servable, signature, list(outputs))
            queue.tasks.append(task)
            queue.rows += count
            # The batch threads wait for the oldest task's timeout; a task joining a queue that
            # already waits changes that only by filling the queue: waking them for each request
            # would make them take the GIL from the handlers for nothing.
            if len(queue.tasks) == 1 or queue.rows >= self.options.max_batch_size:
                self._condition.notify_all()
        return self._wait(task)

    @staticmethod
    def _wait(task: _Task) -> dict[str, np.ndarray]:
        """The task's result; gives up (and has it dropped) once its caller is gone."""
        while True:
            try:
                return task.future.result(timeout=CALLER_CHECK_SECONDS)
            except concurrent.futures.TimeoutError:
                if task.call.abandoned:
                    task.call.cancel()  # the batch thread drops it if it has not run yet
                    task.call.check()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    # --- batch threads -------------------------------------------------------------------------

    def _take_batch(self) -> tuple[_Queue, list[_Task]] | None:
        """Under the lock: the tasks of a queue that is full or timed out, or None.

        Of several such queues, the one whose oldest task has waited longest: a
        queue that is always full (one busy client kind) must not starve the
        others (e.g. REST requests, which ask for other outputs than gRPC ones).
        """
        timeout = self.options.batch_timeout_micros / 1e6
        now = time.monotonic()
        ready = []
        for key, queue in list(self._queues.items()):
            if not queue.tasks:
                del self._queues[key]
            elif queue.rows >= self.options.max_batch_size or now - queue.tasks[0].enqueued >= timeout \
                    or self._closed:
                ready.append(queue)
        if not ready:
            return None
        queue = min(ready, key=lambda q: q.tasks[0].enqueued)
        taken, rows = [], 0
        while queue.tasks and rows + queue.tasks[0].rows <= self.options.max_batch_size:
            rows += queue.tasks[0].rows
            taken.append(queue.tasks.pop(0))
        queue.rows -= rows
        return queue, taken

    def _next_deadline(self) -> float | None:
        oldest = [queue.tasks[0].enqueued for queue in self._queues.values() if queue.tasks]
        if not oldest:
            return None
        return max(0.0, min(oldest) + self.options.batch_timeout_micros / 1e6 - time.monotonic())

    def _work(self) -> None:
        while True:
            with self._condition:
                batch = self._take_batch()
                while batch is None:
                    if self._closed and not self._queues:
                        return
                    self._condition.wait(self._next_deadline())
                    batch = self._take_batch()
            self._run(*batch)

    def _run(self, queue: _Queue, tasks: list[_Task]) -> None:
        live = []
        for task in tasks:
            if (error := task.call.error()) is not None:
                task.future.set_exception(error)
            else:
                live.append(task)
        if not live:
            return
        try:
            results = self._run_merged(queue, live)
        except Exception as error:
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            # One bad request must not fail the others: run each on its own.
            log.info("a batch of %d requests failed (%s); running them one by one", len(live), error)
            self.batches_split += 1
            for task in live:
                self._run(queue, [task])
            return
        start = 0
        for task in live:
            task.future.set_result({alias: value[start:start + task.rows] for alias, value in results.items()})
            start += task.rows

    def _run_merged(self, queue: _Queue, tasks: list[_Task]) -> dict[str, np.ndarray]:
        rows = sum(task.rows for task in tasks)
        padded = next((size for size in self.options.allowed_batch_sizes if size >= rows), rows)
        inputs = {}
        for alias in tasks[0].inputs:
            parts = [task.inputs[alias] for task in tasks]
            if padded > rows:  # pad with copies of the first row, dropped afterwards
                parts.append(np.repeat(parts[0][:1], padded - rows, axis=0))
            inputs[alias] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # The batch runs until its last waiting request's deadline (none if one has none), as
        # TF Serving's batching session does (batching/batching_session.cc).
        remaining = [task.call.remaining() for task in tasks]
        timeout = None if None in remaining else max(remaining)
        results = queue.servable.run(queue.signature, inputs, queue.outputs, timeout=timeout)
        for alias, value in results.items():
            # TF Serving's words, with the output named.
            if value.ndim == 0:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"Batched output tensor has 0 dimensions (output '{alias}')")
            if value.shape[0] != padded:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                                   "Batched output tensor's 0th dimension does not equal the sum of the 0th "
                                   f"dimension sizes of the input tensors (output '{alias}': "
                                   f"{list(value.shape)} for {padded} rows)")
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, rows)
        return results

