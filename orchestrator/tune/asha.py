"""ASHA rungs that survive ``Tuner.restore``.

Ray Tune 2.60 saves the searcher's and the callbacks' state with the experiment, not the
scheduler's: a restored sweep's ASHA starts with empty rungs, and trials resumed after the
driver died are judged against nobody (seen: after a kill, two barely-training trials ran to the
end beside two finished good ones). ``AshaRungs`` is a Tune callback that holds the sweep's
``ASHAScheduler``; Tune saves its state (each rung's recorded results) with every experiment
checkpoint and gives it back on restore, before any trial runs again. The scheduler and the
callback are pickled together in the Tuner's state, so after a restore they still share the
scheduler object.
"""

from __future__ import annotations

from typing import Any

from ray import tune


class AshaRungs(tune.Callback):
    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def get_state(self) -> dict[str, Any]:
        return {"rungs": [[(milestone, dict(recorded)) for milestone, recorded in bracket._rungs]
                          for bracket in self.scheduler._brackets]}

    def set_state(self, state: dict[str, Any]) -> None:
        for bracket, saved in zip(self.scheduler._brackets, state.get("rungs", [])):
            by_milestone = dict(saved)
            for milestone, recorded in bracket._rungs:
                recorded.update(by_milestone.get(milestone, {}))
