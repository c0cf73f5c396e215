"""Progress on stderr for the commands and the demo: :class:`Progress`."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Dict, Iterator


class Progress:
    """Numbered steps on stderr, one ``[2/6] what ...`` line per step, or a
    tqdm bar when tqdm is installed and stderr is a terminal; silent when
    disabled. Use each step as a context manager; :attr:`times` holds the
    seconds each step took.

    >>> progress = Progress(2, enabled=False)
    >>> with progress.step("building"):
    ...     pass
    >>> list(progress.times), progress.done
    (['building'], 1)
    """

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total
        self.done = 0
        self.bar: Any = None
        self.times: Dict[str, float] = {}
        if enabled and sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm  # optional dependency

                self.bar = tqdm(total=total, file=sys.stderr, leave=False, bar_format="{l_bar}{bar}| {n}/{total} [{elapsed}]")

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Announce step ``what``, run the ``with`` block, record its time."""
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(what)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {what} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.times[what] = time.perf_counter() - start
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        """Remove the bar (lines need no closing)."""
        if self.bar is not None:
            self.bar.close()
