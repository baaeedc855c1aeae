"""Did a run start? The baseline-health gate, read from a record's per-epoch history.

A comparison of two nets says something about the nets only if both trained.
Under a short schedule He et al.'s plain ResNet-32 can sit at chance for
epochs (docs/collapse.md), and then the paired difference measures that
failure. The gate a plan fixes before its runs: (a) the first epoch's
training loss below chance, and (b) no epoch after the second at chance,
that is training loss at or above chance or validation accuracy at or
below chance accuracy plus one point. For 10 classes chance is ln 10 =
2.303, taken as 2.30, and chance accuracy 0.10, so the bound is 0.11.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math

from pipeline.train.rundir import HistoryRow

# Epochs at the start that may sit at chance without failing (b): a net may take two to get going.
GRACE_EPOCHS = 2


def chance_loss(num_classes: int) -> float:
    """ln(K), the cross-entropy of a uniform guess, rounded down to two decimals (2.30 for 10)."""
    return math.floor(100 * math.log(num_classes)) / 100


def chance_accuracy_bound(num_classes: int) -> float:
    """Validation accuracy at or below this is chance: 1/K plus one point (0.11 for 10)."""
    return round(1 / num_classes + 0.01, 4)


@dataclasses.dataclass(frozen=True)
class StartHealth:
    first_epoch_loss: float
    # Epochs after the grace epochs at chance, by number.
    epochs_at_chance: tuple[int, ...]
    chance_loss: float
    chance_accuracy: float

    @property
    def passed(self) -> bool:
        return self.first_epoch_loss < self.chance_loss and not self.epochs_at_chance

    def reasons(self) -> list[str]:
        """What fails the gate, as a reader says it; empty when it passes."""
        reasons = []
        if self.first_epoch_loss >= self.chance_loss:
            reasons.append(f"first-epoch training loss {self.first_epoch_loss:.3f} is not below "
                           f"{self.chance_loss:.2f}")
        if self.epochs_at_chance:
            reasons.append(f"at chance in epoch(s) {', '.join(map(str, self.epochs_at_chance))}")
        return reasons

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "passed": self.passed, "reasons": self.reasons()}


def start_health(history: tuple[HistoryRow, ...] | list[HistoryRow], num_classes: int) -> StartHealth:
    if not history:
        raise ValueError("a run without a finished epoch has no start to judge")
    loss_bound, accuracy_bound = chance_loss(num_classes), chance_accuracy_bound(num_classes)
    at_chance = tuple(row.epoch for row in history
                      if row.epoch > GRACE_EPOCHS and (row.loss >= loss_bound
                      or (row.val_accuracy is not None and row.val_accuracy <= accuracy_bound)))
    return StartHealth(first_epoch_loss=history[0].loss, epochs_at_chance=at_chance,
                       chance_loss=loss_bound, chance_accuracy=accuracy_bound)


def gate_statement(num_classes: int) -> str:
    loss = f"{chance_loss(num_classes):.2f}"
    return (f"first-epoch training loss below {loss} (chance, ln {num_classes}), and no epoch after the "
            f"{_ordinal(GRACE_EPOCHS)} at chance (training loss at or above {loss}, or validation accuracy at or "
            f"below {chance_accuracy_bound(num_classes):g})")


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(n, f"{n}th")
