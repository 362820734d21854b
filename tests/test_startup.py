"""Time to first step by phase (train/startup.py), from events.jsonl records."""

from orchestrator.train.startup import (PHASES, first_step_after, phase_event, startup_breakdown, startup_line,
                                        time_to_first_step)


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
    assert time_to_first_step(first + second) == 29.0 and time_to_first_step(first) is None
    # A later invocation that trained nothing (the run was complete: it resumed at the last step)
    # leaves the start-up of the newest one that did.
    rerun = [_ev("started", 300.0), phase_event("ray", 302.0), phase_event("workers", 310.0),
             _ev("resumed", 315.0, step=61), phase_event("restore", 316.0)]
    assert time_to_first_step(first + second + rerun) == 29.0 and time_to_first_step(first + rerun) is None


def test_training_again_after_a_resubmission_is_the_first_step_after_it():
    events = [_ev("started", 0.0), _ev("first_step", 20.0, step=1), _ev("started", 100.0),
              _ev("first_step", 118.0, step=31), _ev("started", 200.0), _ev("first_step", 215.0, step=61)]
    assert first_step_after(events, 0.0) == 20.0
    assert first_step_after(events, 95.0, until=190.0) == 118.0  # the attempt submitted at 95 s trained at 118 s
    assert first_step_after(events, 119.0, until=190.0) is None  # that attempt never trained
    assert first_step_after(events, 216.0) is None


def test_a_start_that_never_trained_has_no_time_to_first_step():
    events = [_ev("started", 0.0), phase_event("ray", 1.0), phase_event("data", 2.0)]
    assert startup_breakdown(events) == [("ray", 1.0), ("data", 1.0)]
    assert startup_line(events) is None
    assert startup_breakdown([]) == [] and startup_line([]) is None


def test_raydiffs_trainer_starts_no_helper_actor_a_run_does_not_need(ray_local, monkeypatch):
    """Ray Train adds its datasets callback (an actor process per worker group) even to a trainer
    given no datasets, and its placement-group cleaner (an actor process per run) even when the
    Ray session ends with the run or serves no state API for it to ask; raydiff's trainer
    (train/trainer.py) leaves them out then only."""
    import dataclasses

    import ray.data
    from ray.train import ScalingConfig

    import orchestrator.ray_session as session
    from orchestrator.train.trainer import Trainer

    def names(**kw):
        trainer = Trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kw)
        return {type(c).__name__ for c in trainer._create_default_callbacks()}

    # The tests' Ray starts as raydiff's local Ray does: without a dashboard, so no state API.
    assert not session.state_api_served()
    no_state_api = names()
    monkeypatch.setattr(session, "_local_ray", dataclasses.replace(session._local_ray, state_api=True))
    assert session.state_api_served()
    plain, with_data = names(), names(datasets={"train": ray.data.range(4)})
    own_session = names(ray_session_ends_with_run=True)
    assert "DatasetsCallback" not in plain and "DatasetsCallback" in with_data
    # Everything else Ray Train sets up is still there.
    assert with_data - plain == {"DatasetsCallback"}
    assert {"BackendSetupCallback", "PlacementGroupCleanerCallback"} <= plain
    assert plain - own_session == {"PlacementGroupCleanerCallback"}
    assert no_state_api == own_session
    monkeypatch.setattr(session, "_local_ray", None)  # a Ray this process did not start: assumed to serve it
    assert session.state_api_served() and "PlacementGroupCleanerCallback" in names()


def test_a_run_that_owns_its_local_ray_asks_no_autoscaler_for_resources(monkeypatch):
    """Ray Train's fixed scaling policy registers the run's resources with Ray Data's
    AutoscalingCoordinator (a detached actor it creates, then waits for) before the workers
    start; a Ray session that ends with the run has no autoscaler, so raydiff's trainer gives the
    controller a policy that makes the same decisions and no requests (train/scaling.py)."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, ResizeDecision

    from orchestrator.train.scaling import NoAutoscalerScalingPolicy
    from orchestrator.train.trainer import Trainer

    given = {}
    monkeypatch.setattr(Trainer, "_run_controller", lambda self, kw: given.update(kw))
    sc = ScalingConfig(num_workers=3, resources_per_worker={"CPU": 2})
    for ends_with_run in (False, True):
        Trainer(lambda: None, scaling_config=sc, ray_session_ends_with_run=ends_with_run)._initialize_and_run_controller(
            scaling_policy=FixedScalingPolicy(sc), other="kept")
        assert given["other"] == "kept"
        assert type(given["scaling_policy"]) is (NoAutoscalerScalingPolicy if ends_with_run else FixedScalingPolicy)
    policy = given["scaling_policy"]
    policy.after_controller_start(None)  # no Ray here: a request would need one
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision) and decision.num_workers == 3 and decision.resources_per_worker == {"CPU": 2}
    assert policy._coordinator_client is None


_UNPICKLE_IN_A_FRESH_PROCESS = """
import sys
import ray.cloudpickle
ray.cloudpickle.loads(sys.stdin.buffer.read())
print("torch" in sys.modules)
"""


def test_the_controller_unpickles_its_arguments_without_importing_torch(ray_local, tmp_path, monkeypatch):
    """Ray Train's controller (a new process per run) unpickles what the trainer hands it before it
    asks for a worker; with Ray's ``TorchConfig`` in it that imports torch (about a second of CPU on
    the path to the first step). raydiff's trainer sets the process group up through its own
    backend config (train/backend.py): the same arguments, unpickled in a fresh process the way the
    controller does, import no torch; with ``TorchConfig`` the same check sees torch."""
    import subprocess
    import sys
    from types import SimpleNamespace

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from orchestrator.train.backend import ProcessGroupConfig
    from orchestrator.train.launch import train_worker
    from orchestrator.train.trainer import Trainer

    given = {}
    # Captures the controller's arguments instead of starting it; fit() reads the result's error.
    monkeypatch.setattr(Trainer, "_run_controller", lambda self, kw: given.update(kw) or SimpleNamespace(error=None))

    def controller_imports_torch(**kw) -> bool:
        given.clear()
        Trainer(train_worker, train_loop_config={"config": {}}, scaling_config=ScalingConfig(num_workers=2),
                run_config=RunConfig(name="c", storage_path=str(tmp_path)), **kw).fit()
        given.pop("train_fn_ref")  # an object ref the controller hands on to the workers unread
        out = subprocess.run([sys.executable, "-c", _UNPICKLE_IN_A_FRESH_PROCESS], input=ray.cloudpickle.dumps(given),
                             capture_output=True, check=True)
        return out.stdout.decode().split()[-1] == "True"

    assert not controller_imports_torch()
    assert controller_imports_torch(torch_config=TorchConfig())
    # NCCL where the workers have GPUs, gloo otherwise (as TorchTrainer chooses).
    for use_gpu, backend in ((False, "gloo"), (True, "nccl")):
        trainer = Trainer(train_worker, scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu))
        assert trainer.backend_config == ProcessGroupConfig(backend=backend)


def test_the_driver_builds_its_trainer_without_importing_torch():
    """``TorchTrainer``'s module imports torch: 1.2-1.4 CPU-s of every driver's and every Tune
    trial's start-up here, in a process that never touches a tensor. raydiff's trainer is Ray
    Train's ``DataParallelTrainer`` with raydiff's process-group backend. A fresh process (pytest's
    has torch loaded); importing ``TorchTrainer``'s module there shows what the check would see."""
    from fresh_python import run_fresh_python

    code = """
import sys
from ray.train import ScalingConfig
from orchestrator.train.launch import train_worker
from orchestrator.train.trainer import Trainer
Trainer(train_worker, scaling_config=ScalingConfig(num_workers=2))
print('torch' in sys.modules)
import ray.train.torch
print('torch' in sys.modules)
"""
    assert run_fresh_python(code).split() == ["False", "True"]


def test_the_controller_gets_no_runtime_env_when_the_sessions_processes_have_its_settings(ray_local, monkeypatch):
    """Ray Train passes its settings to its controller in a runtime env, which costs the controller
    and its helper actors a set-up process each. The tests' Ray starts as raydiff's local Ray does
    (``use_ray_train_settings(LOCAL_RAY_TRAIN_ENV)``, then ``start_local_ray``): its processes have
    every one of them, so the trainer starts the controller without one; a setting changed after
    Ray started, or a Ray this process did not start, gets Ray's own way."""
    import dataclasses

    import orchestrator.ray_session as session
    from orchestrator.train.report_drain import ReportDrainingController
    from orchestrator.train.session_env import SessionEnvController, controller_env
    from orchestrator.train.trainer import controller_actor

    env = controller_env()
    assert env["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] == "0" and session.inherited(env)
    cls, options = controller_actor(env)
    assert cls is SessionEnvController and "runtime_env" not in options and options["num_cpus"] == 0
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "7")  # after the session started
    env = controller_env()
    assert not session.inherited(env)
    cls, options = controller_actor(env)  # Ray's own way: the settings in a runtime env
    assert cls is ReportDrainingController and options["runtime_env"] == {"env_vars": env}
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "7" and options["label_selector"]
    monkeypatch.undo()
    monkeypatch.setattr(session, "_local_ray", dataclasses.replace(session._local_ray, address="another-session:6379"))
    assert session.local_ray_env() is None and not session.inherited({}) and session.state_api_served()


def test_a_driver_on_a_cluster_hands_its_controller_the_poll_interval_unless_the_user_set_one(monkeypatch):
    """On a cluster Ray Train passes the driver's ``RAY_TRAIN_*`` variables to its controller in a
    runtime env: connecting sets raydiff's poll interval there (a run's end and the checkpoints
    queued behind a poll are seen within 0.5 s, not 2 s: train/report_drain.py), and keeps the
    user's own value."""
    import os

    import ray

    import orchestrator.ray_session as session

    connected = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: connected.append(kw))
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    assert session.init_ray("ray://head:10001", 2) is True
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == session.RAY_TRAIN_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert connected == [{"address": "ray://head:10001", "log_to_driver": True}]
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    session.init_ray("ray://head:10001", 2)
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3" and len(connected) == 2
    # The preemption watcher stays on there (spot nodes are taken back on clouds).
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in session.RAY_TRAIN_ENV


def test_a_tune_trial_adopts_the_ray_train_settings_of_its_sweeps_local_ray(ray_local, monkeypatch):
    """A trial's training driver is a Tune actor, not the process that started the sweep's Ray: the
    sweep hands it the Ray Train settings that Ray's processes inherited (tune/runner.py), only
    those (no other variable of the driver's environment travels), and whether that Ray serves
    the state API (its trials' trainers then start no placement-group cleaner)."""
    import orchestrator.ray_session as session
    from orchestrator.train.session_env import controller_env

    settings = session.ray_train_settings()
    assert settings["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert "AWS_SECRET_ACCESS_KEY" not in settings and set(settings) <= set(session.local_ray_env())
    monkeypatch.setattr(session, "_local_ray", None)  # a trial's process: it started no Ray
    assert session.ray_train_settings() is None and not session.inherited(controller_env())
    assert session.state_api_served()  # nothing known of this session: assumed
    session.adopt_session_settings(settings, state_api=False)
    assert session.inherited(controller_env()) and not session.state_api_served()


def test_the_workers_get_no_runtime_env_when_the_controller_has_every_variable_it_would_set(ray_local, monkeypatch):
    """The controller started without a runtime env has the session's environment; its worker
    group (train/session_env.py) gives the workers a runtime env only for a variable the session
    lacks or has otherwise, or for anything besides variables. The tests' Ray starts with the
    training workers' variables (DeepSpeed's accelerator, the quiet log levels), as raydiff's."""
    import orchestrator.ray_session as session
    from orchestrator.plan import local_gpus
    from orchestrator.train.launch import worker_env_vars
    from orchestrator.train.session_env import SessionEnvWorkerGroup

    assert session.inherited(worker_env_vars(local_gpus(), verbose=False))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    runtime_env = SessionEnvWorkerGroup._get_worker_runtime_env
    assert runtime_env({"env_vars": {"DS_ACCELERATOR": "cpu"}}) is None
    other = runtime_env({"env_vars": {"DS_ACCELERATOR": "cuda"}})
    assert other["env_vars"]["DS_ACCELERATOR"] == "cuda" and other["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    assert runtime_env({"env_vars": {"DS_ACCELERATOR": "cpu"}, "pip": ["x"]})["pip"] == ["x"]
