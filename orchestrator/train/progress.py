"""Training progress as rank 0 shows it: a live bar on a terminal, plain lines everywhere else.

The driver decides the mode (``orchestrator.logs.progress_mode``: the workers' stdout is never a
terminal) and passes it in ``WorkerArgs`` (train/launch.py). ``bar`` draws Ray's distributed
tqdm, which the driver renders in place. ``lines`` is for job logs, CI and files: one line when
training starts, one every ``logging.progress_every_s`` seconds, one per checkpoint and one at
the end, never a redraw and never an escape code, so that a captured log reads top to bottom.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from tqdm import tqdm as _tqdm

from orchestrator.logs import ProgressMode


def _rate_text(images_per_s: float | None) -> str:
    return "" if images_per_s is None or not math.isfinite(images_per_s) else f", {images_per_s:.0f} img/s"


class Progress:
    """Rank 0's view of the loop. ``step``/``logged``/``checkpoint``/``close`` are cheap no-ops
    where nothing is due, so the loop calls them unconditionally."""

    def __init__(self, mode: ProgressMode, *, name: str, total: int, start_step: int, every_s: float,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.mode, self.name, self.total, self.every_s = mode, name, total, every_s
        self.start_step = self.step_now = start_step
        self.clock = clock
        self.emit = emit or (lambda line: print(line, flush=True))
        self.loss: float | None = None
        self.images_per_s: float | None = None
        self._t0: float | None = None  # the first step of this invocation (start-up excluded)
        self._step0 = start_step
        self._last_line = 0.0
        self._bar = None
        if mode == "bar":
            from ray.experimental.tqdm_ray import tqdm

            self._bar = tqdm(total=total, desc=f"train {name}")
            self._bar.update(start_step)  # tqdm_ray has no `initial`

    # -- what the loop reports -----------------------------------------------------------------
    def step(self, step: int) -> None:
        advanced, self.step_now = step - self.step_now, step
        if self._bar is not None:
            self._bar.update(advanced)
            return
        if self.mode != "lines":
            return
        now = self.clock()
        if self._t0 is None:
            self._t0 = self._last_line = now
            self._step0 = step
            self.emit(f"raydiff: training {self.name}: step {step}/{self.total} (first step of this run"
                      f"{'' if self.start_step == 0 else f', resumed at step {self.start_step}'})")
        elif now - self._last_line >= self.every_s and step < self.total:
            self._last_line = now
            self.emit(self._line(now))

    def logged(self, rec: dict[str, Any]) -> None:
        """A metrics record (train/metrics.py) was written: its loss and rate go in the next line."""
        self.loss, self.images_per_s = rec.get("loss"), rec.get("images_per_s")
        if self._bar is not None and self.loss is not None:
            # tqdm_ray has no postfix: loss and images/s go in the description.
            self._bar.set_description(f"train {self.name} loss {self.loss:.4f}{_rate_text(self.images_per_s)}")

    def checkpoint(self, step: int, where: str, stall_s: float) -> None:
        if self.mode != "lines":
            return
        loss = "" if self.loss is None else f", loss {self.loss:.4f}"
        self.emit(f"raydiff: checkpoint at step {step}/{self.total}{loss}: {where} "
                  f"(training paused {stall_s:.1f} s)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self._t0 is not None:
            self.emit(self._line(self.clock(), final=True))
            self._t0 = None

    # -- formatting ----------------------------------------------------------------------------
    def _line(self, now: float, final: bool = False) -> str:
        done = self.step_now - self._step0  # steps timed since the first one
        elapsed = now - (self._t0 or now)
        pct = 100.0 * self.step_now / max(self.total, 1)
        text = f"raydiff: step {self.step_now}/{self.total} ({pct:.0f}%)"
        if self.loss is not None:
            text += f", loss {self.loss:.4f}"
        text += _rate_text(self.images_per_s)
        text += f", {_tqdm.format_interval(elapsed)} elapsed"
        if not final and done > 0 and elapsed > 0:
            eta = (self.total - self.step_now) * elapsed / done
            text += f", about {_tqdm.format_interval(eta)} left"
        return text
