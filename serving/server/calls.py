"""One request's life: abandoned once its deadline passes or its client leaves.

The transports make a `Call` per request (gRPC from its context's deadline and
liveness, REST from its timeout and connection) and the model server checks it
before the expensive part: a request nobody waits for any more is dropped
before it runs, and never holds a thread or a batch slot. Once it runs, its
deadline goes with it into TensorFlow (RunOptions.timeout_in_ms), which stops
the run when it passes; a client that leaves without a deadline cannot stop
a run already started (nor can it in TF Serving), which the row limit bounds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from serving.server.errors import ServingError

# RunOptions.timeout_in_ms as TF Serving sets it: gpr_time_to_millis of the time left
# (model_servers/prediction_service_util.cc), an int that saturates at INT32_MAX, which is
# what a call without a deadline gets. gRPC's Python server reports such a call's time left as
# a huge number of seconds, not None; at or beyond this bound a call has no deadline here.
MAX_TIMEOUT_MS = 2**31 - 1


class Call:
    # One per request: no lock or Event of its own (a flag set once and read by the batch
    # thread needs neither; building an Event cost more than the rest of the Call).
    __slots__ = ("deadline", "_alive", "_cancelled")

    def __init__(self, timeout: float | None = None, alive: Callable[[], bool] | None = None):
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._alive = alive
        self._cancelled = False

    @classmethod
    def from_grpc(cls, context: grpc.ServicerContext) -> Call:
        remaining = context.time_remaining()
        if remaining is not None and remaining * 1000 >= MAX_TIMEOUT_MS:
            remaining = None
        return cls(timeout=remaining, alive=context.is_active)

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def remaining(self) -> float | None:
        """Seconds until the deadline (at least a millisecond), or None without one."""
        return None if self.deadline is None else max(1e-3, self.deadline - time.monotonic())

    @property
    def abandoned(self) -> bool:
        """Cancelled, past its deadline, or its client is gone."""
        return self._cancelled or self.expired or (self._alive is not None and not self._alive())

    def error(self) -> ServingError | None:
        """DEADLINE_EXCEEDED or CANCELLED when nobody waits for the answer any more, else None."""
        if self.expired:
            return ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed before it ran")
        if self.abandoned:
            return ServingError(grpc.StatusCode.CANCELLED, "the client left before the request ran")
        return None

    def check(self) -> None:
        if (error := self.error()) is not None:
            raise error


NO_CALL = Call()  # for work with no client (warmup)
