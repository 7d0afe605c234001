"""`organtrain sweep`: a Ray Tune search per organ, all organs at once, resumable.

The driver plans the run (which organs, which dataset version), starts one `organ.OrganSearch`
actor per unfinished organ (restarted, up to ORGAN_RETRIES times, if its process or node
is lost), and then only watches: it merges the organs' progress into
`runs/<run_id>/status.json`, prints a line when an organ's picture changes, and writes
`runs/<run_id>/summary.parquet` (one row per organ) at the end. Killed at any point, the
same command continues: finished organs are skipped (their result.json is there), the
others restore their Tune experiments from storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from organtrain.config import RunConfig
from organtrain.console import notice
from organtrain.data.dataset import load_dataset
from organtrain.data.manifest import parquet_bytes
from organtrain.errors import ConfigError, OrgantrainError
from organtrain.runlocks import organ_lock, run_lock
from organtrain.search.job import SweepJob, expected_replicas, progress_key, trial_prefix
from organtrain.signals import interrupt_on
from organtrain.storage import Storage, join_key, open_storage
from organtrain.train import RESULT, require_same_settings, trial_settings

log = logging.getLogger(__name__)

SWEEP = "sweep.json"
STATUS = "status.json"
SUMMARY = "summary.parquet"
# Search settings that may change when a sweep is resumed: they change how it runs, not
# what it finds.
_RESUMABLE_SEARCH_FIELDS = {"max_concurrent_trials", "max_failures"}
# Passed from the driver to the Ray it uses, so trials find the same storage. Nothing
# secret: Ray writes the runtime_env into its logs and its state. Credentials come from
# the standard chain where the trial runs: a Ray started here inherits this process's
# environment (AWS_ACCESS_KEY_ID, ...) anyway; on a cluster each node uses its own
# identity (instance or pod role, its own profile). Not ORGANTRAIN_CACHE_DIR: the shard
# cache is node-local, and a runtime_env variable overrides the node's own, so every
# node's trials would use the driver's folder (a path that may not exist there). A Ray
# started here inherits it; cluster-wide, input.cache_dir in the job is the default.
_FORWARDED_ENV = ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
# Times an organ's search controller is started again after its process or node was lost.
ORGAN_RETRIES = 2


@dataclass
class SweepOutcome:
    run_id: str
    uri: str  # the run's folder
    rows: list[dict]  # summary rows, one per organ
    failed: list[str] = field(default_factory=list)
    report: str | None = None  # URL of runs/<run_id>/report.html

    @property
    def ok(self) -> bool:
        return not self.failed


def sweep(
    cfg: RunConfig,
    *,
    run_id: str | None = None,
    address: str | None = None,
    progress: bool = True,
    dataset_version: str | None = None,
    report: bool = True,
) -> SweepOutcome:
    """Search every organ of `cfg.search.organs` (None: all) on `dataset_version` (None:
    the latest; a resumed run keeps the version it started with).

    Raises RunLocked (exit 3) while another sweep of `run_id`, or a `train` of one of its
    organs, is running: the run and each of its organs have one writer. The nightly calls
    this under its own lock (nightly/locks/), a different key: no deadlock."""
    run_id = run_id or cfg.name
    cfg = _absolute_paths(cfg)
    storage = open_storage(
        cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region
    )
    with run_lock(storage, run_id), contextlib.ExitStack() as organ_locks:
        plan = _plan(cfg, storage, run_id, dataset_version)
        for organ in plan["organs"]:
            organ_locks.enter_context(organ_lock(storage, run_id, organ))
        return _sweep_planned(cfg, storage, run_id, plan, address, progress, report)


def _sweep_planned(
    cfg: RunConfig, storage: Storage, run_id: str, plan: dict, address, progress, report
) -> SweepOutcome:
    job = SweepJob(cfg, run_id, plan["dataset_version"], expected_replicas(cfg))
    organs = plan["organs"]
    rows: dict[str, dict] = {}
    for organ in organs:
        key = join_key(trial_prefix(run_id, organ), RESULT)
        if storage.exists(key):
            from organtrain.search.organ import summary_row

            result = json.loads(storage.get_bytes(key))
            rows[organ] = summary_row(job, organ, result)
    todo = [organ for organ in organs if organ not in rows]
    if rows:
        notice(log, "already finished in run %s: %s", run_id, ", ".join(sorted(rows)))
    watcher = _Watcher(storage, job, organs, rows, progress)
    if todo:
        _connect(address or cfg.resources.address, cfg)
        _check_room(cfg, todo)
        _run_searches(job, todo, rows, watcher)
    ordered = [rows[organ] for organ in organs]
    from organtrain.search.results import summary_table

    storage.put_bytes(join_key("runs", run_id, SUMMARY), parquet_bytes(summary_table(ordered)))
    failed = [r["organ"] for r in ordered if r["state"] != "done"]
    watcher.write_status("failed" if failed else "finished")
    report = _write_report(storage, run_id) if report else None
    return SweepOutcome(run_id, storage.url(join_key("runs", run_id)), ordered, failed, report)


def _write_report(storage: Storage, run_id: str) -> str | None:
    """The run's HTML report; the results are already safe, so a report that cannot be
    built is a warning (rebuild it with `organtrain report`), not a failed sweep."""
    from organtrain.report import build_report

    try:
        return storage.url(build_report(storage, run_id))
    except Exception as err:  # any failure here must not fail the sweep
        log.warning("the report could not be written (%s: %s); retry with `organtrain "
                    "report %s`", type(err).__name__, err, run_id)  # fmt: skip
        return None


def _run_searches(job: SweepJob, todo: list[str], rows: dict, watcher: _Watcher) -> None:
    import ray

    from organtrain.search.organ import OrganSearch

    # The controllers only drive Tune: they take no CPU, so trials get all of it, and
    # reserve the controller's memory (resources.search_memory_mb).
    memory = job.cfg.resources.search_memory_mb * 2**20
    controller = ray.remote(OrganSearch).options(num_cpus=0, memory=memory, max_restarts=0)
    job = _fair_share(job, len(todo))
    job_ref = ray.put(job)

    def start(organ: str, attempt: int) -> None:
        actor = controller.remote()
        running[actor.search.remote(job_ref, organ)] = (organ, actor, attempt)

    running: dict = {}  # search's result ref -> (organ, its controller, restarts so far)
    for organ in todo:
        start(organ, 0)
    log.info(
        "searching %d organ(s) at once: %s (%d trials each%s)",
        len(todo), ", ".join(todo), job.cfg.search.samples,
        "" if not _has_grid(job) else " per grid point",
    )  # fmt: skip
    # SIGUSR1 too: SLURM's warning before the time limit. Every epoch is checkpointed, so
    # stopping now and running the same command later loses at most the epochs in flight.
    try:
        with interrupt_on(signal.SIGTERM, signal.SIGUSR1):
            while running:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
                for ref in ready:
                    organ, actor, attempt = running.pop(ref)
                    try:
                        rows[organ] = ray.get(ref)
                    except ray.exceptions.RayActorError as err:
                        # The controller's process or node is gone (not an error the
                        # search raised): a new one restores the organ's search from its
                        # saved experiment; finished trials stay finished, the others
                        # resume from their last checkpoint.
                        if attempt < ORGAN_RETRIES:
                            log.warning(
                                "%s: its search's controller was lost (%s); starting it "
                                "again (%d of %d), the search resumes where it was saved",
                                organ, _first_line(err), attempt + 1, ORGAN_RETRIES,
                            )  # fmt: skip
                            _free_lost_controllers_groups(organ, actor)
                            start(organ, attempt + 1)
                            continue
                        rows[organ] = _failed_row(job, organ, err)
                    except ray.exceptions.RayError as err:
                        rows[organ] = _failed_row(job, organ, err)
                    ray.kill(actor)  # done: its memory reservation back to the cluster
                    watcher.organ_finished(organ)
                watcher.poll()
    except KeyboardInterrupt:
        watcher.write_status("interrupted")
        # Killing a controller ends its trials and frees their placement groups; the
        # saved experiment (at most the last 2 s older) is what the next run restores.
        for _, actor, _ in running.values():
            ray.kill(actor)
        raise


def _free_lost_controllers_groups(organ: str, actor) -> None:
    """Remove the placement groups a lost controller created for its trials.

    Ray ends a placement group once both the actor and the job that created it are dead:
    a lost controller's groups stay while this driver (their job) lives, holding CPUs and
    GPUs for trials that are gone, and the controller started again waits behind them
    (for ever where they hold all the cluster has: one organ on a 1-CPU node)."""
    import ray

    # From organ.py, which workers import without TensorFlow (this module imports it).
    from organtrain.search.organ import remove_placement_groups_created_by

    free = ray.remote(remove_placement_groups_created_by).options(num_cpus=0, max_retries=3)
    try:
        removed = ray.get(free.remote(actor._actor_id.hex()), timeout=120)
    except Exception as err:  # the retry may still go ahead: only slower where they block it
        log.warning(
            "%s: the placement groups of its lost controller could not be removed (%s: %s); "
            "their resources stay reserved until this sweep ends",
            organ, type(err).__name__, _first_line(err),
        )  # fmt: skip
        return
    notice(log, "%s: removed %d placement group(s) of its lost controller: %s",
           organ, len(removed), ", ".join(removed) or "none left")  # fmt: skip


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _fair_share(job: SweepJob, organs: int) -> SweepJob:
    """Without a limit, the first organ's Tune would take every free slot and the other
    organs would wait for its trials; a share of the slots each keeps them all moving.

    Tune fixes the limit when an organ's search starts, so on a cluster that can grow the
    share is of the slots it will have at its largest (its autoscaler's node types and
    limits), not of the few it has when the sweep starts: each organ's trials wait for
    the nodes the autoscaler adds for them. Where no bound is known (a node type without
    a limit, or of a size set at launch) there is no cap: the trials wait, pending, and
    the autoscaler grows the cluster for them as far as it may."""
    from organtrain.search import capacity

    search = job.cfg.search
    if search.max_concurrent_trials:
        return job
    r = job.cfg.resources
    cluster = capacity.discover()
    slots = capacity.slots_at_most(cluster, r.cpus_per_trial, r.gpus_per_trial)
    share = capacity.share_per_organ(slots, organs)
    if cluster.growable:
        notice(
            log,
            "the Ray cluster can grow (%s: %s): %s",
            cluster.source, capacity.describe_node_types(cluster) or "node types not visible",
            "no limit known, so no cap on trials per organ" if share is None else
            f"up to {slots} trial(s) at once, {share} per organ",
        )  # fmt: skip
    if share is None:
        return job
    search = dataclasses.replace(search, max_concurrent_trials=share)
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, search=search))


def _failed_row(job: SweepJob, organ: str, err: Exception) -> dict:
    cause = getattr(err, "cause", None)
    counts = getattr(cause, "counts", None)  # an OrganFailed's trial counts
    counts = counts if isinstance(counts, dict) else {}
    if isinstance(cause, OrgantrainError):
        message = str(cause)
    else:
        lines = [line for line in str(err).splitlines() if line.strip()]
        message = f"{organ}: {lines[-1] if lines else type(err).__name__}"
    log.error("%s", message)
    return {
        "run_id": job.run_id, "organ": organ, "state": "failed", "model": job.cfg.model.name,
        "trial_id": None, "trial_config": None, "metric": job.cfg.search.metric,
        "val_value": math.nan, "test_accuracy": math.nan, "test_macro_f1": math.nan,
        "test_macro_roc_auc": math.nan, "test_images": 0, "trials": 0,
        "trials_stopped_early": 0, "trials_errored": 0, **counts, "seconds": 0.0,
        "error": message,
    }  # fmt: skip


def _has_grid(job: SweepJob) -> bool:
    entries = [job.cfg.search.space, *job.cfg.search.organ_space.values()]
    return any(isinstance(v, dict) and "grid" in v for e in entries for v in e.values())


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Trials run in other processes, other folders, maybe other nodes: local paths in
    the config must not depend on this command's working directory."""
    if "://" not in cfg.storage.uri or cfg.storage.uri.startswith("file://"):
        uri = str(Path(cfg.storage.uri.removeprefix("file://")).expanduser().absolute())
        cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, uri=uri))
    if cfg.input.cache_dir:
        cache = str(Path(cfg.input.cache_dir).expanduser().absolute())
        cfg = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, cache_dir=cache))
    return cfg


def sweep_settings(cfg: RunConfig) -> dict:
    search = {
        k: v for k, v in dataclasses.asdict(cfg.search).items() if k not in _RESUMABLE_SEARCH_FIELDS
    }
    return {**trial_settings(cfg), "search": search}


def _plan(
    cfg: RunConfig, storage: Storage, run_id: str, dataset_version: str | None = None
) -> dict:
    """The run's plan, `runs/<run_id>/sweep.json`: written by the first invocation, read
    by every later one, so a resumed sweep uses the same dataset version and organs."""
    key = join_key("runs", run_id, SWEEP)
    settings = sweep_settings(cfg)
    if storage.exists(key):
        plan = json.loads(storage.get_bytes(key))
        require_same_settings(plan["settings"], settings, storage.url(join_key("runs", run_id)))
        return plan
    index = load_dataset(storage, cfg.prepare.dataset, dataset_version)
    available = sorted(index.organs)
    organs = cfg.search.organs or available
    for organ in [*organs, *cfg.search.organ_space]:
        if organ not in available:
            raise ConfigError(
                f"organ {organ!r} (search.organs / search.organ_space) is not in dataset "
                f"{index.dataset} version {index.version}; its organs: {', '.join(available)}"
            )
    for organ in organs:
        if cfg.search.metric.startswith("val_") and index.split_size(organ, "val") == 0:
            raise ConfigError(
                f"{organ} has no validation images, and search.metric is "
                f"{cfg.search.metric}: set prepare.val_fraction above 0 and prepare again, "
                "or select on the training metric (search.metric: loss)"
            )
    _refuse_train_results(storage, run_id, organs)
    plan = {
        "run_id": run_id,
        "dataset": index.dataset,
        "dataset_version": index.version,
        "organs": list(organs),
        "metric": cfg.search.metric,
        "mode": cfg.search.mode,
        "started": _now(),
        "settings": settings,
    }
    storage.put_bytes(key, json.dumps(plan, indent=2).encode())
    return plan


def _refuse_train_results(storage: Storage, run_id: str, organs: list[str]) -> None:
    """A new sweep cannot start in a run id where `organtrain train` already published an
    organ: its result has no search to report, and a sweep would skip it as finished."""
    trained = [o for o in organs if storage.exists(join_key(trial_prefix(run_id, o), RESULT))]
    if trained:
        raise ConfigError(
            f"run {run_id} already holds `organtrain train` results for "
            f"{', '.join(trained)} ({storage.url(join_key('runs', run_id))}): a sweep needs a "
            "run id of its own; give another with --run-id (or `name` in the job file)"
        )


def _connect(address: str | None, cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return  # a caller (a notebook, a test) already chose the cluster
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if address:
            notice(log, "connecting to the Ray cluster at %s", address)
            ray.init(address=address, runtime_env={"env_vars": env}, **quiet)
        else:
            notice(log, "starting a local Ray (set RAY_ADDRESS or --address to use a cluster)")
            ray.init(
                num_cpus=cfg.resources.local_cpus, include_dashboard=False,
                runtime_env={"env_vars": env}, **quiet,
            )  # fmt: skip
    except ConnectionError as err:
        raise OrgantrainError(
            f"cannot connect to the Ray cluster at {address}: {err}. Is it running "
            "(`ray status`)? A cluster started with `ray start` needs RAY_AUTH_MODE=token "
            "in this shell too."
        ) from None


def _check_room(cfg: RunConfig, organs: list[str]) -> None:
    """Tune would wait forever for a trial no node can hold: say so now. On a cluster
    that can grow, only a trial larger than every node type it may add is refused; while
    no live node has room yet, ask its autoscaler for the organs' trials and wait."""
    from organtrain.search import capacity

    r = cfg.resources
    cluster = capacity.discover()
    if capacity.never_fits(cluster, r.cpus_per_trial, r.gpus_per_trial):
        raise ConfigError(_no_room_message(cfg, cluster))
    if capacity.slots_now(cluster, r.cpus_per_trial, r.gpus_per_trial):
        return
    slots = capacity.slots_at_most(cluster, r.cpus_per_trial, r.gpus_per_trial)
    share = cfg.search.max_concurrent_trials or capacity.share_per_organ(slots, len(organs))
    at_once = sum(min(share or math.inf, _trials_per_organ(cfg, organ)) for organ in organs)
    capacity.wait_for_room(cluster, r.cpus_per_trial, r.gpus_per_trial, int(at_once))


def _no_room_message(cfg: RunConfig, cluster) -> str:
    """Names the field(s) no node can satisfy, and the nodes there are or may be."""
    from organtrain.search import capacity

    r = cfg.resources
    sizes = [*cluster.nodes, *(t.resources for t in cluster.node_types if t.resources)]
    asks = (("cpus", r.cpus_per_trial, "CPU"), ("gpus", r.gpus_per_trial, "GPU"))
    too_large = [
        f"resources.{what}_per_trial is {asked:g}"
        for what, asked, name in asks
        if asked and all(size.get(name, 0) < asked for size in sizes)
    ] or [  # each fits some node alone, never both on one
        f"resources.cpus_per_trial is {r.cpus_per_trial:g} with resources.gpus_per_trial "
        f"{r.gpus_per_trial:g}"
    ]  # fmt: skip
    where = f"the Ray cluster has {capacity.describe_nodes(cluster.nodes)}"
    if cluster.growable:
        added = capacity.describe_node_types(cluster)
        where += f"; its autoscaler can add {added}, read from {cluster.source}"
    else:
        where += "; it cannot add nodes"
    return (
        f"{' and '.join(too_large)}, but no node can hold such a trial ({where}). No "
        "trial could ever start (a trial runs on one node): lower it to what one node "
        "holds, or use a cluster with larger nodes"
    )


def _trials_per_organ(cfg: RunConfig, organ: str) -> int:
    """samples × grid points: how many trials one organ's search has in all."""
    from organtrain.search.space import organ_space

    grid = [len(d.values) for d in organ_space(cfg, organ).values() if d.kind == "grid"]
    return cfg.search.samples * math.prod(grid)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Watcher:
    """Merges the organs' progress files into status.json and shows what changed: with -v
    a line per organ when its picture changes, else one progress bar of all trials."""

    def __init__(self, storage: Storage, job: SweepJob, organs: list[str], rows: dict, show):
        self.storage, self.job, self.organs, self.rows, self.show = storage, job, organs, rows, show
        self.progress: dict[str, dict] = {}
        self.printed: dict[str, tuple] = {}
        self.last_printed: dict[str, float] = {}
        self.last_status = 0.0
        self.bar = None  # tqdm, made at the first poll

    def poll(self) -> None:
        for organ in self.organs:
            if organ in self.rows:
                continue
            key = progress_key(self.job.run_id, organ)
            try:
                self.progress[organ] = json.loads(self.storage.get_bytes(key))
            except OrgantrainError:
                continue  # not written yet
            self._print(organ)
        self._update_bar()
        if time.monotonic() - self.last_status >= 5.0:
            self.write_status("running")

    def _update_bar(self) -> None:
        """Trials finished of all the run's trials (samples x grid points per organ), and
        organs done; an organ finished earlier counts as all its trials."""
        if not self.show or log.isEnabledFor(logging.INFO):
            return  # no bars (--no-progress), or the per-organ lines of -v instead
        if self.bar is None:
            from tqdm import tqdm

            total = sum(_trials_per_organ(self.job.cfg, organ) for organ in self.organs)
            # Into a file (a SLURM log) every redraw is kept: one a minute is enough there.
            every = 0.1 if _is_terminal(sys.stderr) else 60.0
            self.bar = tqdm(total=total, desc="sweep", unit="trial", mininterval=every, miniters=0)
        finished = 0
        for organ in self.organs:
            if organ in self.rows:
                finished += _trials_per_organ(self.job.cfg, organ)
            else:
                t = self.progress.get(organ, {}).get("trials") or {}
                finished += t.get("terminated", 0) + t.get("error", 0)
        self.bar.set_postfix_str(f"{len(self.rows)}/{len(self.organs)} organs done", False)
        self.bar.update(min(finished, self.bar.total) - self.bar.n)  # redrawn every mininterval

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def organ_finished(self, organ: str) -> None:
        row = self.rows[organ]
        if row["state"] == "done":
            log.info(
                "%s: done — best trial %s (%s %.4f), test accuracy %.3f, macro F1 %.3f "
                "on %d images; %d trials, %d stopped early, %d failed",
                organ, row["trial_id"], row["metric"], row["val_value"], row["test_accuracy"],
                row["test_macro_f1"], row["test_images"], row["trials"],
                row["trials_stopped_early"], row["trials_errored"],
            )  # fmt: skip
        self._update_bar()
        self.write_status("running")

    def _print(self, organ: str) -> None:
        p = self.progress[organ]
        t = p["trials"]
        picture = (t["terminated"], t["error"], t["running"], p["best"])
        now = time.monotonic()
        finished = t["terminated"] + t["error"]
        # A line when something changed, at most every 10 s per organ unless a trial ended.
        before = self.printed.get(organ, (0, 0, 0, None))
        ended = finished != before[0] + before[1]
        recent = now - self.last_printed.get(organ, 0) < 10
        if not self.show or picture == before or (recent and not ended):
            return
        self.printed[organ], self.last_printed[organ] = picture, now
        best = "" if p["best"] is None else f", best {self.job.cfg.search.metric} {p['best']:.4f}"
        extra = f", {p['stopped_early']} stopped early" if p["stopped_early"] else ""
        extra += f", {t['error']} failed" if t["error"] else ""
        log.info(
            "%s: %d/%d trials finished (%d running%s)%s",
            organ, finished, t["total"], t["running"], extra, best,
        )  # fmt: skip

    def write_status(self, state: str) -> None:
        if state != "running":  # finished, failed or interrupted: the bar's last picture
            self._close_bar()
        self.last_status = time.monotonic()
        organs = {}
        for organ in self.organs:
            p = self.progress.get(organ, {})
            row = self.rows.get(organ)
            trials = p.get("trials") or {
                "total": 0, "pending": 0, "running": 0, "terminated": 0, "error": 0
            }  # fmt: skip
            if row is not None:
                organ_state = row["state"]
            elif not p:
                organ_state = "pending"
            elif trials["total"] and trials["terminated"] + trials["error"] == trials["total"]:
                organ_state = "evaluating"
            else:
                organ_state = "searching"
            organs[organ] = {
                "state": organ_state,
                "trials": trials,
                "stopped_early": p.get("stopped_early", row["trials_stopped_early"] if row else 0),
                # Once the organ is over, its row: a trial that failed is never its best.
                "best": row["val_value"] if row else p.get("best"),
                "best_trial": row["trial_id"] if row else p.get("best_trial"),
                "error": row["error"] if row else None,
                "test_accuracy": row["test_accuracy"] if row and row["state"] == "done" else None,
            }
        status = {
            "run_id": self.job.run_id,
            "updated": _now(),
            "state": state,
            "metric": self.job.cfg.search.metric,
            "mode": self.job.cfg.search.mode,
            "organs": organs,
        }
        text = json.dumps(json_safe(status), indent=2)
        self.storage.put_bytes(join_key("runs", self.job.run_id, STATUS), text.encode())


def json_safe(value):
    """JSON has no NaN: an undefined number is null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
