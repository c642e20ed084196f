"""Progress over long loops: a bar on a terminal, plain lines in a log.

``progress=None`` (the default everywhere) shows a tqdm bar when stderr is a terminal and prints a
plain line every 10% of the work (or every 30 s when the total is unknown) when it is not, so a
long epoch is never silent in a log file; ``progress=False`` shows nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress"]

T = TypeVar("T")

_PLAIN_EVERY_S = 30.0


class Progress:
    """Wraps an iterable; ``postfix()`` supplies the numbers shown beside the count."""

    def __init__(self, items: Iterable[T], *, total: int | None, desc: str, unit: str = "batch",
                 enabled: bool | None = None, postfix: Callable[[], str] | None = None,
                 stream: Any = None) -> None:
        self.items = items
        self.total = total
        self.desc = desc
        self.unit = unit
        self.postfix = postfix or (lambda: "")
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.mode = "off" if enabled is False else ("bar" if tty else "lines")
        if enabled is True and not tty:
            self.mode = "lines"

    def __iter__(self) -> Iterator[Any]:
        if self.mode == "bar":
            bar = tqdm(self.items, total=self.total, desc=self.desc, unit=self.unit, file=self.stream)
            for item in bar:
                yield item
                text = self.postfix()
                if text:
                    bar.set_postfix_str(text, refresh=False)
            bar.close()
            return
        start = last = time.perf_counter()
        next_tenth = 1
        done = 0
        for item in self.items:
            yield item
            done += 1
            if self.mode == "off":
                continue
            now = time.perf_counter()
            due = (self.total and done * 10 >= next_tenth * self.total) or (not self.total and now - last >= _PLAIN_EVERY_S)
            if due or (self.total and done == self.total):
                while self.total and done * 10 >= next_tenth * self.total:
                    next_tenth += 1
                last = now
                of = f"/{self.total}" if self.total else ""
                extra = self.postfix()
                plural = self.unit + ("es" if self.unit.endswith(("ch", "s")) else "s")
                line = f"{self.desc}: {done}{of} {plural}, {now - start:.1f} s" + (f", {extra}" if extra else "")
                # one write with its newline: print() writes the end separately, and a signal handler
                # raising in between (SIGTERM) left the next error glued to this line
                self.stream.write(line + "\n")
                self.stream.flush()
