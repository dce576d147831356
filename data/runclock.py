"""A run's clock for --time-limit-minutes, and for the times metrics.json reports.

Every chapter with a time limit stops the same way: after the epoch (or the chunk of epochs)
during which the run's working time passed the limit, and says so. The clock carries over
--resume: an interrupted run goes on with the time it had spent.
"""

from __future__ import annotations

import time


class RunClock:
    """Working seconds (`wall_seconds`: training and validation, not the loading before the first
    epoch) and, within them, the optimisation steps alone (`train_seconds`)."""

    def __init__(self, minutes: float, wall_seconds: float = 0.0, train_seconds: float = 0.0) -> None:
        self.limit = 60.0 * minutes  # 0: no limit
        self.minutes = minutes
        self.wall_seconds = wall_seconds
        self.train_seconds = train_seconds
        self._since = time.monotonic()

    def restart(self) -> None:
        """Start counting from now (after loading, or after a pause that should not count)."""
        self._since = time.monotonic()

    def elapsed(self) -> float:
        """Working seconds so far, the current lap included."""
        return self.wall_seconds + time.monotonic() - self._since

    def lap(self) -> float:
        """Close the current lap into `wall_seconds`; the seconds it took."""
        now = time.monotonic()
        seconds, self._since = now - self._since, now
        self.wall_seconds += seconds
        return seconds

    def add_training(self, seconds: float) -> None:
        self.train_seconds += seconds

    def out_of_time(self, ahead: float = 0.0) -> bool:
        """True once the working time (plus `ahead` seconds of work still to come) passes the limit."""
        return 0 < self.limit < self.elapsed() + ahead

    def stop_message(self, epoch: int, epochs: int) -> str:
        return (f"stopping after epoch {epoch} of {epochs}: over --time-limit-minutes {self.minutes:g} "
                f"({self.elapsed() / 60:.1f} min)")

    def state(self) -> dict:
        """The times, for a checkpoint (RunClock(minutes, **state) puts them back)."""
        return {"wall_seconds": self.wall_seconds, "train_seconds": self.train_seconds}
