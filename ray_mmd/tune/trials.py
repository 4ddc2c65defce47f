"""Running a sweep: the trial function around the stage-1 TorchTrainer, the Tuner and its restore."""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import time
from typing import Any

from ray_mmd import storage
from ray_mmd.errors import UserError
from ray_mmd.tune.board import leaderboard, write_outputs
from ray_mmd.tune.record import FAILED_SCORE, SCORE, eval_steps, event, events, score_of
from ray_mmd.tune.space import SPACE_FILE, Sweep, check_data, check_resources, cluster_nodes, trial_config

log = logging.getLogger("ray_mmd.tune")


def _tune_report_callback_cls():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoreReport(TuneReportCallback):
        """On the Train controller: forward each evaluation (not the interval checkpoints, whose eval
        values are stale) to Tune with its epoch and score; record worker-group failures."""

        def __init__(self, evals: list[int], trial_url: str) -> None:
            super().__init__()
            self.evals = evals
            self.trial_url = trial_url

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = metrics[0]
            if m.get("reason") not in ("epoch", "final"):
                return
            out = {k: v for k, v in m.items() if k.startswith("eval/")}
            out["step"] = int(m["step"])
            out["epoch"] = bisect.bisect_right(self.evals, out["step"])
            s = score_of(m)
            out[SCORE] = FAILED_SCORE if math.isnan(s) else s
            out["final"] = m.get("reason") == "final"
            self._training_actor_item_queue.put(out)

        def after_exception(self, run_context, worker_exceptions) -> None:
            errs = {int(k): f"{type(v).__name__}: {str(v)[:300]}" for k, v in worker_exceptions.items()}
            event(self.trial_url, "failure", errs)

    return ScoreReport


def _trial_fn(config: dict[str, Any], plan: dict[str, Any]) -> None:
    """One trial: build the stage's TorchTrainer (named after the trial id) and fit it."""
    import ray.tune

    from ray_mmd.data import manifest as mf
    from ray_mmd.train import stages
    from ray_mmd.train.loop import ABORTED
    from ray_mmd.train.trainer import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    trial_url = storage.join(plan["url"], "trials", trial_id)
    cfg = trial_config(plan["base"], config)
    cfg.run.name = trial_id  # never a timestamp: a restarted trial finds its own checkpoints
    cfg.run.storage = storage.join(plan["url"], "train")
    cfg.run.workers = list(plan["workers"])
    cfg.run.cpus_per_worker = plan["cpus_per_worker"]
    cfg.run.use_gpu = "true" if plan["gpus_per_worker"] > 0 else "false"
    cfg.run.progress = False
    if events(trial_url).get("done"):
        # finished before the driver was lost, but Tune's saved state had not caught up: not re-run
        log.info("trial %s already finished: not re-running it", trial_id)
        return
    storage.write_bytes_atomic(
        storage.join(trial_url, "settings.json"), json.dumps({"params": config}, default=str).encode()
    )
    event(trial_url, "start")
    aborted = storage.join(stages.run_url(cfg), ABORTED)
    storage.remove(aborted)
    evals = eval_steps(cfg, mf.load(cfg.data.url))
    res = {"CPU": plan["cpus_per_worker"]}
    if plan["gpus_per_worker"] > 0:
        res["GPU"] = plan["gpus_per_worker"]
    trainer = build_trainer(
        cfg, callbacks=[_tune_report_callback_cls()(evals, trial_url)], resources_per_worker=res
    )
    from ray.train import TrainingFailedError

    fitting = _end_train_run_when_tune_stops()
    try:
        trainer.fit()
    except TrainingFailedError as e:  # out of retries; Tune marks the trial errored (resumed on restore)
        # (other exceptions here are the teardown of a trial Tune stopped: its actors die under fit())
        event(trial_url, "error", f"{type(e).__name__}: {str(e).strip().splitlines()[-1:] or ''}")
        raise
    finally:
        fitting.set()
    if storage.exists(aborted):  # a NaN streak: a result, not an error to retry (it would recur)
        event(trial_url, "aborted", storage.read_bytes(aborted).decode())
        log.warning("trial %s stopped on non-finite losses", trial_id)
        return
    event(trial_url, "done")


def _end_train_run_when_tune_stops():
    """When Tune stops this trial (ASHA), end the process, and with it the Train controller it owns and
    that controller's workers. A graceful actor exit would wait for fit(), whose run would then train
    on to its full budget, holding the resources ASHA meant to free. Returns the event to set once
    fit() has returned on its own."""
    import threading

    from ray.train._internal.session import get_session

    session, done = get_session(), threading.Event()
    if session is None:
        return done

    def watch() -> None:
        while not done.is_set():
            if session.stop_event.wait(0.5) and not done.is_set():
                time.sleep(1.0)  # let stop() answer Tune first
                if not done.is_set():
                    os._exit(0)
                return

    threading.Thread(target=watch, name="tune-stop-watch", daemon=True).start()
    return done


def _trainable(sw: Sweep):
    from ray import tune

    plan = {
        "url": sw.url,
        "base": sw.base,
        "workers": sw.resources.workers,
        "cpus_per_worker": sw.resources.cpus_per_worker,
        "gpus_per_worker": sw.resources.gpus_per_worker,
    }
    # the trial process only waits on fit(): a token CPU (Tune refuses 0); the Train workers hold the rest
    return tune.with_resources(tune.with_parameters(_trial_fn, plan=plan), {"CPU": 0.01})


def param_space(sw: Sweep) -> dict[str, Any]:
    from ray import tune

    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    out = {}
    for key, spec in sw.space.items():
        ((dist, args),) = spec.items()
        out[key] = make[dist](args)
    return out


def _epochs(sw: Sweep) -> int:
    from ray_mmd.data import manifest as mf

    cfg = trial_config(sw.base, {})
    return len(eval_steps(cfg, mf.load(cfg.data.url)))


class _Printer:
    """One line per trial evaluation and per trial end, instead of Tune's status tables."""

    def __new__(cls):
        from ray.tune import Callback

        class P(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                print(
                    f"trial {trial.trial_id}: epoch {result.get('epoch')} step {result.get('step')} "
                    f"score {result.get(SCORE, float('nan')):.4f}",
                    flush=True,
                )

            def on_trial_complete(self, iteration, trials, trial, **info):
                last = trial.last_result or {}
                print(
                    f"trial {trial.trial_id}: ended at epoch {last.get('epoch')} step {last.get('step')}",
                    flush=True,
                )

            def on_trial_error(self, iteration, trials, trial, **info):
                print(f"trial {trial.trial_id}: error (see {trial.local_path})", flush=True)

        return P()


def _tuner(sw: Sweep, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    fs, path = storage.pyarrow_filesystem(sw.url)
    trainable = _trainable(sw)
    if restore:
        return tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, param_space=param_space(sw), storage_filesystem=fs
        )
    if sw.asha is not None:
        # max_t one past the schedule: a trial that reaches its budget ends on its own, not killed by ASHA
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=_epochs(sw) + 1,
            grace_period=sw.asha.get("grace_period", 1),
            reduction_factor=sw.asha.get("reduction_factor", 2),
        )
    else:
        scheduler = FIFOScheduler()
    sfs, spath = storage.pyarrow_filesystem(sw.storage)
    return tune.Tuner(
        trainable,
        param_space=param_space(sw),
        tune_config=tune.TuneConfig(
            metric=sw.metric,
            mode=sw.mode,
            num_samples=sw.num_samples,
            max_concurrent_trials=sw.max_concurrent_trials,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=sw.seed, max_concurrent=sw.max_concurrent_trials),
        ),
        run_config=tune.RunConfig(
            name=sw.name,
            storage_path=spath,
            storage_filesystem=sfs,
            callbacks=[_Printer()],
            verbose=0,
        ),
    )


def can_restore(sw: Sweep) -> bool:
    from ray import tune

    fs, path = storage.pyarrow_filesystem(sw.url)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def check_resume(sw: Sweep, resume: bool) -> bool:
    """True if the experiment exists and was made from this sweep; errors for a wrong --resume."""
    space_url = storage.join(sw.url, SPACE_FILE)
    exists = storage.exists(space_url)
    if resume and not exists:
        raise UserError(
            f"--resume: no sweep experiment at {sw.url}: check sweep.name/--storage, or drop --resume to start it"
        )
    if not exists:
        return False
    saved = json.loads(storage.read_bytes(space_url))
    if saved.get("fingerprint") != sw.fingerprint():
        raise UserError(
            f"experiment {sw.url} was made from a different search space or base config: restore it with its "
            "original sweep file, or pick a new sweep.name (--name)"
        )
    return True


def _connect(sw: Sweep) -> bool:
    """Join RAY_ADDRESS (or the base config's run.ray_address), or start a local Ray; True if we started it.

    The job's processes get RAY_ADDRESS too: Train V2 frees a stopped trial's resources from a detached
    PlacementGroupCleaner that finds the cluster through it (else through /tmp/ray/ray_current_cluster,
    which names whichever cluster started last on the machine); without it a trial that ASHA stopped
    keeps its workers' CPUs reserved and later trials never start."""
    from ray_mmd.train.trainer import connect_ray

    return connect_ray(trial_config(sw.base, {}), log_to_driver=False)


def run(sw: Sweep, resume: bool = False) -> dict[str, Any]:
    """Start the sweep, or restore it when this experiment already exists; returns the leaderboard."""
    import ray

    # Tune saves the experiment state at most this often (default 10 s+): what a lost driver can forget
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")
    exists = check_resume(sw, resume)
    check_data(sw)
    started = _connect(sw)
    try:
        check_resources(sw.resources, cluster_nodes())
        restore = exists and can_restore(sw)
        if not exists:
            storage.write_bytes_atomic(
                storage.join(sw.url, SPACE_FILE),
                json.dumps(
                    {"fingerprint": sw.fingerprint(), "base": sw.base, "space": sw.space}, indent=1
                ).encode(),
            )
        print(f"{'restoring' if restore else 'starting'} sweep {sw.url}", flush=True)
        _tuner(sw, restore).fit()
        board = leaderboard(sw.url)
        write_outputs(sw.url, board)
        return board
    finally:
        if started:
            ray.shutdown()
