"""Stopping a run on purpose, and noticing when another worker stopped it.

SIGTERM (preemption, a node drain, `kubectl delete pod`) asks every worker to
stop after the same step, with a checkpoint there (StopRequest, Preempted);
a worker that vanishes or stops answering makes the collectives fail on the
others, which then stop with one line that says so (PeerLost). Each has an
exit status a job controller can act on.
"""

from __future__ import annotations

import logging
import signal
import threading

import tensorflow as tf

from pipeline.errors import UserError

log = logging.getLogger(__name__)


# Exit statuses a job controller can act on. 143 (128 + SIGTERM) is what a
# process stopped by SIGTERM reports; both are retriable for Kubeflow's
# ExitCode restart policy (128-255), and the Indexed Job ignores 143 (its
# podFailurePolicy) since a preemption is nobody's failure.
EXIT_PREEMPTED = 143
EXIT_PEER_LOST = 144


class Preempted(UserError, RuntimeError):
    """SIGTERM: a checkpoint was saved at a step all workers agreed on, and the run stopped."""

    exit_status = EXIT_PREEMPTED


class PeerLost(UserError, RuntimeError):
    """Another worker vanished or stopped answering; the last checkpoint stays."""

    exit_status = EXIT_PEER_LOST


class StopRequest:
    """SIGTERM asks the run to stop at the next step boundary.

    The request travels as a vote in the step's own all-reduce, so every
    worker learns of it after the same step, whichever worker got the signal.
    Installed after the strategy is made: TensorFlow's coordination service
    installs a SIGTERM handler of its own, which would otherwise swallow it.
    """

    def __init__(self):
        self.requested = False
        self._votes = (tf.constant(0.0), tf.constant(1.0))
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exception) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signal_number, frame) -> None:
        self.requested = True
        log.warning("SIGTERM: the run stops after the next step, once its checkpoint is saved")

    def vote(self) -> tf.Tensor:
        return self._votes[self.requested]


# What a collective op raises on the survivors when a peer dies or stops answering.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.DeadlineExceededError, tf.errors.InternalError, tf.errors.UnknownError,
               tf.errors.FailedPreconditionError)


def peer_error_summary(error: tf.errors.OpError) -> str:
    """The line of a collective's error that says what happened to the peer."""
    lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
    telling = [line for line in lines if any(clue in line.lower() for clue in PEER_CLUES)]
    return (telling or lines or [type(error).__name__])[0][:300]


PEER_CLUES = ("unhealthy", "heartbeat", "reset by peer", "socket closed", "connection refused", "failed to connect",
              "unavailable", "deadline")
