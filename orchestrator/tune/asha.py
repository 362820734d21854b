"""ASHA rungs that survive ``Tuner.restore``, even after a kill at any moment.

Ray Tune 2.60 saves the searcher's and the callbacks' state with the experiment, not the
scheduler's: a restored sweep's ASHA starts with empty rungs, and trials resumed after the
driver died are judged against nobody (seen: after a kill, two barely-training trials ran to the
end beside two finished good ones). ``AshaRungs`` is a Tune callback that holds the sweep's
``ASHAScheduler``; Tune saves its state (each rung's recorded results) with every experiment
checkpoint and gives it back on restore, before any trial runs again. The scheduler and the
callback are pickled together in the Tuner's state, so after a restore they still share the
scheduler object.

That saved state can be older than the trial statuses it is restored with: Tune writes the
experiment state and the callbacks' state as separate files and copies them to storage one by
one, so a kill between two copies restores a trial as finished (or past a rung) without its rung
record (seen in CI: no trial stopped early after such a restore). Those records never come back
by themselves: a finished trial does not run again and a resumed one continues past the rung.
So on the first step after a restore the rungs are completed from the trials' own metric logs
(``metrics.jsonl``, written by each run as it trains, ahead of anything Tune saves): for every
trial that Tune had seen reach a milestone, the first result at or past the milestone, which is
the one ASHA recorded.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ray import tune

from orchestrator.storage import StorageError

log = logging.getLogger("raydiff.tune")

# trial id -> its (step, metric) results over its whole life (tune/results.py: trial_history)
History = Callable[[str], list[tuple[int, float]]]


class AshaRungs(tune.Callback):
    def __init__(self, scheduler: Any, history: History | None = None):
        self.scheduler = scheduler
        # Reads storage with the job's credentials: attached at run time, never pickled into
        # the Tuner's state (which Tune writes to the sweep directory).
        self.history = history
        self._completed = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "history": None, "_completed": False}

    def get_state(self) -> dict[str, Any]:
        return {"rungs": [[(milestone, dict(recorded)) for milestone, recorded in bracket._rungs]
                          for bracket in self.scheduler._brackets]}

    def set_state(self, state: dict[str, Any]) -> None:
        for bracket, saved in zip(self.scheduler._brackets, state.get("rungs", [])):
            by_milestone = dict(saved)
            for milestone, recorded in bracket._rungs:
                recorded.update(by_milestone.get(milestone, {}))

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        # The first step of a sweep, fresh or restored: only restored trials have results.
        if self._completed:
            return
        self._completed = True
        if self.history is not None:
            self.complete_from_history(trials)

    def complete_from_history(self, trials: list[Any]) -> None:
        """Record, for every trial Tune had seen reach a milestone, its result at that milestone
        where the rung lacks it."""
        s = self.scheduler
        for trial in trials:
            last = trial.last_result or {}
            reached = last.get(s._time_attr)
            bracket = s._trial_info.get(trial.trial_id)
            if not isinstance(reached, (int, float)) or bracket is None:
                continue
            # A trial's final result (done) stops it without Tune asking the scheduler; the
            # rung at max_t is never recorded (a result there stops the trial).
            seen = (lambda step: step < reached) if last.get("done") else (lambda step: step <= reached)
            missing = [(m, rec) for m, rec in bracket._rungs
                       if seen(m) and m < s._max_t and trial.trial_id not in rec]
            if not missing:
                continue
            try:
                history = self.history(trial.trial_id)
            except (StorageError, OSError) as e:
                log.warning("ASHA rungs of trial %s not completed from its metrics (%s): they keep "
                            "what Tune saved", trial.trial_id, e)
                continue
            for milestone, recorded in missing:
                at = next((value for step, value in history if step >= milestone and seen(step)), None)
                if at is not None:
                    recorded[trial.trial_id] = s._metric_op * at
