"""A progress bar in seconds whose estimate is re-made from what the work has taken so far.

The whole-step advisor's work is a list of units (a worker starting, a plan's model built and its first
step compiled, a round of timed steps, ...) of a few kinds.  Workers report each finished unit as it
happens (a JSON line in a file the parent polls, :func:`poll_file`), so the bar moves while a worker runs
rather than jumping when it returns.  The bar counts seconds: ``n`` is the time spent, ``total`` that plus
the estimate of what is left -- each remaining unit at the mean duration of the finished units of its
kind (a plan's own mean for its timing rounds, once it has one), or at a starting guess before any has
finished.  So tqdm's "remaining" is that estimate, and it is revised with every unit.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

#: starting guesses (seconds) before a unit of the kind has finished, from runs on a 2-core VM
GUESS_S = {"describe": 12.0, "start": 7.0, "build": 5.0, "rewarm": 1.5, "calibrate": 0.6, "round": 0.7}


@dataclass
class Unit:
    kind: str
    key: str = ""  # e.g. the plan (timing rounds of one plan take alike)
    done: bool = False
    seconds: float = 0.0


@dataclass
class Tracker:
    """The units of work and how long the finished ones took; :meth:`remaining_s` estimates the rest."""

    units: list = field(default_factory=list)
    guesses: dict = field(default_factory=lambda: dict(GUESS_S))

    def add(self, kind: str, key: str = "") -> None:
        self.units.append(Unit(kind, key))

    def finish(self, kind: str, key: str, seconds: float) -> None:
        """Mark the first unfinished unit of ``kind`` (and ``key`` when one matches) done."""
        for u in self.units:
            if not u.done and u.kind == kind and u.key == key:
                break
        else:
            u = next((u for u in self.units if not u.done and u.kind == kind), None)
            if u is None:
                return
        u.done, u.seconds = True, max(0.0, seconds)

    hints: dict = field(default_factory=dict)  # (kind, key) -> seconds, until a unit of them has finished

    def hint(self, kind: str, key: str, seconds: float) -> None:
        """What one unit of ``kind`` and ``key`` should take (e.g. a timing round, from one step's time)."""
        self.hints[(kind, key)] = max(0.0, float(seconds))

    def estimate(self, u: Unit) -> float:
        same = [x.seconds for x in self.units if x.done and x.kind == u.kind and x.key == u.key and u.key]
        if same:
            return sum(same) / len(same)
        if (u.kind, u.key) in self.hints:
            return self.hints[(u.kind, u.key)]
        kind = [x.seconds for x in self.units if x.done and x.kind == u.kind]
        if kind:
            return sum(kind) / len(kind)
        return self.guesses.get(u.kind, 1.0)

    def remaining_s(self) -> float:
        return sum(self.estimate(u) for u in self.units if not u.done)


class Bar:
    """A tqdm bar over :class:`Tracker` (seconds); disabled when not ``enabled``."""

    def __init__(self, tracker: Tracker, desc: str = "dsgd layouts", enabled: bool = True):
        self.tracker = tracker
        self.t0 = time.perf_counter()
        self.history: list = []  # (seconds spent, estimated total): how the estimate held
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=round(tracker.remaining_s(), 1), desc=desc, unit="s", leave=False, file=sys.stderr,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def refresh(self, note: str = "") -> None:
        spent = time.perf_counter() - self.t0
        if not self.history or spent - self.history[-1][0] >= 1.0:
            self.history.append((round(spent, 1), round(spent + self.tracker.remaining_s(), 1)))
        if self.bar is None:
            return
        self.bar.total = round(spent + self.tracker.remaining_s(), 1)
        self.bar.n = round(min(spent, self.bar.total), 1)
        if note:
            self.bar.set_postfix_str(note[:50], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def poll_file(path: str, offset: int, on_line: Callable[[dict], None]) -> int:
    """Hand each complete new JSON line of ``path`` (from byte ``offset``) to ``on_line``; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return offset
    end = data.rfind(b"\n")
    if end < 0:
        return offset
    for line in data[:end].splitlines():
        try:
            on_line(json.loads(line))
        except ValueError:
            continue
    return offset + end + 1


def run_polling(work: Callable[[], object], path: Optional[str], on_line: Callable[[dict], None],
                tick: Callable[[], None], every_s: float = 1.0):
    """Run ``work()`` in a thread (it only waits on a worker process: no TensorFlow here) while polling
    ``path`` for progress lines and calling ``tick`` every ``every_s``; returns what ``work`` returned."""
    box: dict = {}

    def target():
        try:
            box["value"] = work()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    offset = 0
    while th.is_alive():
        th.join(every_s)
        if path:
            offset = poll_file(path, offset, on_line)
        tick()
    if path:
        poll_file(path, offset, on_line)
    if "error" in box:
        raise box["error"]
    return box.get("value")


__all__ = ["Tracker", "Unit", "Bar", "poll_file", "run_polling", "GUESS_S"]
