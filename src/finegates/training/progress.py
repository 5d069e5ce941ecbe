"""Training progress that suits where it runs, without reading the device every step.

On a terminal: a live tqdm bar. Elsewhere (a log file, CI, a device command whose output is
collected): one plain line every `every` steps instead of thousands of carriage-return updates.
The statistics shown (loss, removed fraction, ...) come from a callable that the bar calls only every
`every` steps, because each read of a device value waits for the device (a host synchronisation).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm.auto import tqdm


class Progress:
    """`update()` once per step; `write()` for messages that must not break the bar."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every: int) -> None:
        self.total, self.step, self.desc, self.every = total, initial, desc, max(1, every)
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) if self.live else None
        self.t0, self.step0 = time.perf_counter(), initial

    def update(self, stats: Callable[[], dict]) -> None:
        """One step done; every `every` steps (and at the last) show `stats()`."""
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
        if not self.enabled or (self.step % self.every and self.step != self.total):
            return
        values = stats()
        if self.bar is not None:
            self.bar.set_postfix(**values)
            return
        rate = (self.step - self.step0) / max(time.perf_counter() - self.t0, 1e-9)
        line = ", ".join(f"{k} {v}" for k, v in values.items())
        print(f"{self.desc}: step {self.step}/{self.total} ({rate:.2f} steps/s) {line}", file=sys.stderr, flush=True)

    def write(self, message: str) -> None:
        """A message on stdout (evaluation results), shown with or without the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
