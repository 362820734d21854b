"""Time to first step by phase (train/startup.py), from events.jsonl records."""

from orchestrator.train.startup import PHASES, phase_event, startup_breakdown, startup_line


def _ev(name, t, **kw):
    return {"event": name, "time": t, **kw}


def test_breakdown_is_the_gaps_between_phase_ends_of_the_newest_invocation():
    first = [_ev("started", 0.0), phase_event("ray", 1.0), phase_event("data", 5.0)]  # killed while starting
    second = [
        _ev("started", 100.0),
        phase_event("ray", 102.0),
        phase_event("data", 106.5),
        phase_event("workers", 118.0),
        phase_event("engine", 125.0),
        _ev("resumed", 125.5, step=50),
        phase_event("restore", 126.0),
        _ev("first_step", 129.0, step=51),
        _ev("checkpoint", 140.0, step=60),
        # A restarted worker group repeats its phases; the first start is what the user waited for.
        phase_event("workers", 150.0),
        _ev("first_step", 170.0, step=61),
    ]
    parts = startup_breakdown(first + second)
    assert parts == [("ray", 2.0), ("data", 4.5), ("workers", 11.5), ("engine", 7.0), ("restore", 1.0),
                     ("first_step", 3.0)]
    assert [p for p, _ in parts] == list(PHASES)
    line = startup_line(first + second)
    assert line.startswith("time to first step: 29.0 s (ray 2.0 s, data 4.5 s, workers 11.5 s")


def test_a_start_that_never_trained_has_no_time_to_first_step():
    events = [_ev("started", 0.0), phase_event("ray", 1.0), phase_event("data", 2.0)]
    assert startup_breakdown(events) == [("ray", 1.0), ("data", 1.0)]
    assert startup_line(events) is None
    assert startup_breakdown([]) == [] and startup_line([]) is None
