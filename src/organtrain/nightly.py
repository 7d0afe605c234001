"""`organtrain nightly`: prepare what arrived, retrain what changed, promote what is better.

One night, keyed by its date (run id `nightly-YYYY-MM-DD`):

1. a lock in storage, so a second nightly for the same night exits instead of racing;
2. `prepare` on the source: new images are added, the split never moves, an unchanged
   source gives the same dataset version and writes nothing;
3. which organs changed: an organ's fingerprint (its diagnoses and the checksums of its
   shards) is compared with the one recorded by the last night; organs without a
   champion, and organs whose last night failed, count as changed;
4. `sweep` over the changed organs (resumable: it is the same run id on a re-run);
5. per trained organ: the challenger is registered as a model version, the champion is
   evaluated on the same test images, and the configured rule decides; the decision is
   written before the champion pointer moves, so a re-run applies the same decision;
6. the history table `nightly/history.parquet` gets this night's rows (replacing any an
   earlier attempt of the same night wrote), and the report is written.

    runs/<run_id>/nightly.json               the night's plan: dataset version, fingerprints
    runs/<run_id>/decisions/<organ>.json     one decision per organ
    nightly/history.parquet                  one row per organ per night
    nightly/locks/<run_id>.json              held while the night runs
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import time
import typing
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa

from organtrain import registry, stats
from organtrain.config import NightlyConfig, RunConfig
from organtrain.data.dataset import MANIFEST, DatasetIndex, dataset_prefix, load_dataset
from organtrain.data.manifest import parquet_bytes, read_parquet
from organtrain.errors import ObjectNotFoundError
from organtrain.search.sweep import json_safe, sweep
from organtrain.storage import Storage, join_key, open_storage
from organtrain.storage.lock import LockHeld, StorageLock

log = logging.getLogger(__name__)

HISTORY = "nightly/history.parquet"
PLAN = "nightly.json"


class NightlyRunning(LockHeld):
    """Another nightly holds this night's lock."""


@dataclass
class Decision:
    """What one night did for one organ: a history row."""

    night: str
    run_id: str
    organ: str
    dataset_version: str
    fingerprint: str
    changed: bool
    change: str  # why it counts as changed (or not)
    trained: bool
    metric: str
    champion_before: str | None = None
    champion_value: float = math.nan
    challenger: str | None = None
    challenger_value: float = math.nan
    diff: float = math.nan  # challenger - champion, on the same test images
    ci_low: float = math.nan  # paired bootstrap interval of diff
    ci_high: float = math.nan
    test_images: int = 0  # images both were scored on (the paired test's n)
    p_value: float = math.nan  # exact McNemar, this organ's test alone
    # After the correction across tonight's family of tests (the organs compared tonight):
    # nightly.correction (holm | bh | none), the family's size, this organ's adjusted p.
    p_adjusted: float = math.nan
    correction: str | None = None  # None: this organ had no paired test tonight
    tests_tonight: int = 0
    significant: bool = False  # adjusted p < alpha and the interval of diff excludes 0
    promoted: bool = False
    champion_after: str | None = None
    reason: str = ""  # for people: what was decided, with the numbers
    # For programs: first_model, challenger_better, champion_kept, new_diagnosis,
    # not_retrained, training_failed (nightly), forced, rolled_back (by hand).
    reason_code: str = ""
    error: str | None = None


def _arrow_type(hint) -> pa.DataType:
    types = {bool: pa.bool_(), float: pa.float64(), int: pa.int64()}
    return types.get(hint, pa.string())  # else str | None


# One column per Decision field, typed from its annotation.
HISTORY_SCHEMA = pa.schema(
    [pa.field(name, _arrow_type(hint)) for name, hint in typing.get_type_hints(Decision).items()]
)


@dataclass
class NightlyOutcome:
    run_id: str
    decisions: list[Decision]
    report: str | None

    @property
    def failed(self) -> list[str]:
        return [d.organ for d in self.decisions if d.error]


def fingerprints(storage: Storage, index: DatasetIndex) -> dict[str, str]:
    """Per organ, a hash of what its model learns from: every image's content hash with
    its diagnosis and split. New, removed or relabelled images change it; renaming a file,
    or re-encoding shards, does not."""
    manifest = read_parquet(
        storage.get_bytes(join_key(dataset_prefix(index.dataset, index.version), MANIFEST))
    ).to_pylist()
    result = {}
    for organ in index.organs:
        rows = sorted(
            (r["sha256"], r["diagnosis"], r["split"]) for r in manifest if r["organ"] == organ
        )
        text = json.dumps({"diagnoses": index.diagnoses(organ), "images": rows})
        result[organ] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return result


def nightly(
    cfg: RunConfig,
    *,
    night: date | None = None,
    run_id: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> NightlyOutcome:
    night = night or datetime.now(timezone.utc).date()
    run_id = run_id or f"nightly-{night.isoformat()}"
    storage = open_storage(
        cfg.storage.uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region
    )
    with NightLock(storage, run_id, stale_after=cfg.nightly.lock_stale_after_s):
        plan = _plan(cfg, storage, run_id, night, progress)
        changed = [o for o, p in plan["organs"].items() if p["changed"]]
        log.info(
            "night %s: dataset %s version %s; changed: %s", night, cfg.prepare.dataset,
            plan["dataset_version"], ", ".join(changed) or "nothing",
        )  # fmt: skip
        rows = _train(cfg, run_id, changed, plan, address, progress) if changed else {}
        decisions, history = decide_night(cfg, storage, run_id, plan, rows)
        report = _report(storage, run_id, history)
    return NightlyOutcome(run_id, decisions, report)


def _plan(cfg: RunConfig, storage: Storage, run_id: str, night: date, progress: bool) -> dict:
    """What tonight is about, fixed by its first attempt: a re-run after a kill must not
    see its own half-finished work as 'unchanged'."""
    key = join_key("runs", run_id, PLAN)
    if storage.exists(key):
        return json.loads(storage.get_bytes(key))
    from organtrain.data.prepare import prepare

    source = open_storage(
        cfg.prepare.source, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region,
        setting="prepare.source",
    )  # fmt: skip
    prepared = prepare(source, storage, cfg.prepare, progress=progress)
    index = load_dataset(storage, prepared.dataset, prepared.version)
    last = _last_nights(storage, run_id)
    organs = {}
    for organ, fp in sorted(_tonights_fingerprints(storage, index, last).items()):
        previous = last.get(organ)
        has_champion = registry.champion(storage, organ) is not None
        if cfg.nightly.retrain_all:
            change = "nightly.retrain_all is set"
        elif not has_champion:
            change = "no champion yet"
        elif previous is None:
            change = "no earlier night recorded"
        elif previous["error"]:
            change = f"the last night ({previous['night']}) failed"
        elif previous["fingerprint"] != fp:
            change = f"images or diagnoses changed since {previous['night']}"
        else:
            change = ""
        organs[organ] = {"fingerprint": fp, "changed": bool(change),
                         "change": change or f"unchanged since {previous['night']}"}  # fmt: skip
    plan = {
        "night": night.isoformat(),
        "run_id": run_id,
        "dataset": index.dataset,
        "dataset_version": index.version,
        "organs": organs,
    }
    storage.put_bytes(key, json.dumps(plan, indent=2).encode())
    return plan


def _tonights_fingerprints(storage: Storage, index: DatasetIndex, last: dict) -> dict[str, str]:
    """Every organ's fingerprint. When the last night of every organ saw this very dataset
    version, its fingerprints, without reading the manifest: a version's id is a hash of
    each image's key, content hash, organ, diagnosis and split, so one version has one set
    of fingerprints. A night whose source did not change then reads nothing that grows
    with the archive (the manifest is a row per image)."""
    known = {
        organ: last[organ]["fingerprint"] for organ in index.organs
        if organ in last and last[organ]["dataset_version"] == index.version
    }  # fmt: skip
    return known if len(known) == len(index.organs) else fingerprints(storage, index)


def _last_nights(storage: Storage, run_id: str) -> dict[str, dict]:
    """The latest history row per organ, from nights before this one (rows written by
    hand say nothing about what the last night saw)."""
    rows = [
        r for r in _read_history(storage)
        if r["run_id"] != run_id and r.get("reason_code") not in BY_HAND
    ]  # fmt: skip
    last: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r["night"], r["run_id"])):
        last[row["organ"]] = row
    return last


def _train(cfg: RunConfig, run_id: str, organs: list[str], plan: dict, address, progress):
    search = dataclasses.replace(cfg.search, organs=organs)
    outcome = sweep(
        dataclasses.replace(cfg, search=search), run_id=run_id, address=address,
        progress=progress, dataset_version=plan["dataset_version"], report=False,
    )  # fmt: skip
    return {row["organ"]: row for row in outcome.rows}


def decide_night(
    cfg: RunConfig, storage: Storage, run_id: str, plan: dict, rows: dict[str, dict]
) -> tuple[list[Decision], pa.Table]:
    """Every organ's decision for tonight, the champion pointers they move, and the
    history with tonight's rows. `plan`: the night's plan (nightly.json); `rows`: the
    sweep's summary row of each organ trained tonight.

    All organs are compared before any is decided: whether one challenger's p-value is
    small enough depends on how many organs were tested tonight (nightly.correction).
    An organ decided by an earlier attempt of this night keeps its saved decision (and
    its test stays in the family). Every decision is saved before any pointer moves, so a
    re-run applies the same decisions."""
    saved, undecided = {}, {}
    for organ in plan["organs"]:
        key = _decision_key(run_id, organ)
        if storage.exists(key):
            saved[organ] = _decision(json.loads(storage.get_bytes(key)))
        else:
            undecided[organ] = _new_decision(cfg, storage, run_id, organ, plan, rows.get(organ))
    decisions = [saved.get(organ) or undecided[organ] for organ in plan["organs"]]
    apply_rule(cfg.nightly, decisions, list(undecided.values()))
    for organ, decision in undecided.items():
        body = json.dumps(json_safe(asdict(decision)), indent=2).encode()
        storage.put_bytes(_decision_key(run_id, organ), body)
    for decision in decisions:
        # Applied again on a re-run: promoting an already promoted version changes nothing.
        if decision.promoted:
            registry.promote(storage, decision.organ, decision.challenger,
                             reason=decision.reason, reason_code=decision.reason_code)  # fmt: skip
        log.info("%s: %s", decision.organ, decision.reason)
    return decisions, _append_history(storage, run_id, decisions)


def _decision_key(run_id: str, organ: str) -> str:
    return join_key("runs", run_id, "decisions", f"{organ}.json")


def _new_decision(cfg, storage, run_id, organ, plan, row) -> Decision:
    """Tonight's decision for one organ; for an organ whose challenger was compared with
    the champion, only the comparison: `apply_rule` decides it with the night's family."""
    facts = plan["organs"][organ]
    current = registry.champion(storage, organ)
    decision = Decision(
        night=plan["night"], run_id=run_id, organ=organ,
        dataset_version=plan["dataset_version"], fingerprint=facts["fingerprint"],
        changed=facts["changed"], change=facts["change"], trained=row is not None,
        metric=cfg.nightly.metric, champion_before=current.version if current else None,
        champion_after=current.version if current else None,
    )  # fmt: skip
    if row is None:
        decision.reason = f"not retrained: {facts['change']}"
        decision.reason_code = "not_retrained"
        if current is not None:  # the serving model's own test figure, for the trend
            serving = registry.get_version(storage, organ, current.version)
            decision.champion_value = serving.test_metrics.get(cfg.nightly.metric, math.nan)
        return decision
    if row["state"] != "done":
        decision.error = row["error"]
        decision.reason = f"training failed, champion kept: {row['error']}"
        decision.reason_code = "training_failed"
        return decision
    result = json.loads(storage.get_bytes(join_key("runs", run_id, organ, "result.json")))
    metrics = {
        "accuracy": row["test_accuracy"], "macro_f1": row["test_macro_f1"],
        "macro_roc_auc": row["test_macro_roc_auc"],
        "balanced_accuracy": result.get("test_balanced_accuracy", math.nan),
    }  # fmt: skip
    version = registry.register_run_result(
        storage, result, fingerprint=facts["fingerprint"], test_metrics=metrics
    )
    decision.challenger = version.version
    decision.challenger_value = metrics[cfg.nightly.metric]
    if current is None:
        return _promote(decision, f"first model for {organ}: promoted", "first_model")
    old = registry.get_version(storage, organ, current.version)
    if old.classes != version.classes:
        new = sorted(set(version.classes) - set(old.classes))
        gone = sorted(set(old.classes) - set(version.classes))
        what = "; ".join(
            part for part in (f"new diagnoses {', '.join(new)}" if new else "",
                              f"diagnoses gone {', '.join(gone)}" if gone else "") if part
        )  # fmt: skip
        unlike = f"label set changed ({what}): champion and challenger cannot be compared"
        if cfg.nightly.on_new_diagnosis == "promote":
            reason = f"{unlike}; promoted (nightly.on_new_diagnosis: promote)"
            return _promote(decision, reason, "new_diagnosis")
        decision.reason = f"{unlike}; champion kept (nightly.on_new_diagnosis: keep)"
        decision.reason_code = "new_diagnosis"
        return decision
    comparison = _compare(cfg, storage, run_id, organ, plan, old)
    decision.champion_value = comparison.champion
    decision.challenger_value = comparison.challenger
    decision.diff, decision.p_value = comparison.diff, comparison.p_value
    decision.ci_low, decision.ci_high = comparison.ci_low, comparison.ci_high
    decision.test_images = comparison.n
    return decision


CORRECTION_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg"}


def apply_rule(rule: NightlyConfig, tonight: list[Decision], undecided: list[Decision]) -> None:
    """Decide the organs of `undecided` whose challenger was compared with the champion.

    The family is every organ of `tonight` with a paired test (a McNemar p-value); the
    organs without one (not retrained, failed, first model, new diagnosis) are not in it.
    Each compared organ gets its adjusted p-value, and with `require_significant` wins
    only when that is below alpha and the paired interval of the difference lies above
    0: an extra condition on top of the corrected test can only promote less, so the
    correction's guarantee holds. Without `require_significant` the margin rule decides
    and the adjusted p-value is recorded for people to read."""
    tested = [d for d in tonight if not math.isnan(d.p_value)]
    adjusted = stats.adjust_p_values([d.p_value for d in tested], rule.correction)
    waiting = {id(d) for d in undecided}
    for decision, p_adjusted in zip(tested, adjusted, strict=True):
        if id(decision) in waiting:
            decision.p_adjusted, decision.correction = float(p_adjusted), rule.correction
            decision.tests_tonight = len(tested)
            _judge(rule, decision)


def _judge(rule: NightlyConfig, d: Decision) -> None:
    excludes_zero = d.ci_low > 0 or d.ci_high < 0  # False when NaN
    d.significant = bool(d.p_adjusted < rule.alpha and excludes_zero)
    numbers = (
        f"{d.metric} {d.challenger_value:.3f} vs champion {d.champion_value:.3f} on the same "
        f"{d.test_images} test images (diff {d.diff:+.3f}, 95% CI {d.ci_low:+.3f} to "
        f"{d.ci_high:+.3f}, McNemar p={d.p_value:.3g})"
    )
    if rule.require_significant:
        wins = d.significant and d.diff > 0
        if d.correction in CORRECTION_NAMES:
            tested = f"{d.tests_tonight} organ(s) tested tonight"
            family = f"{CORRECTION_NAMES[d.correction]}-adjusted p={d.p_adjusted:.3g} over {tested}"
        else:
            family = "no correction across organs (nightly.correction: none)"
        rule_text = f"significantly better at alpha {rule.alpha:g} required, {family}"
    else:
        wins = d.diff >= -rule.margin
        rule_text = f"not worse by more than {rule.margin:g} required"
    if wins:
        _promote(d, f"promoted: {numbers}; {rule_text}", "challenger_better")
    else:
        d.reason, d.reason_code = f"champion kept: {numbers}; {rule_text}", "champion_kept"


def _decision(saved: dict) -> Decision:
    """A Decision from JSON, where an undefined number was written as null."""
    floats = {n for n, t in typing.get_type_hints(Decision).items() if t is float}
    return Decision(**{k: math.nan if k in floats and v is None else v for k, v in saved.items()})


def _num(value) -> float:
    return math.nan if value is None else float(value)


def _promote(decision: Decision, reason: str, reason_code: str) -> Decision:
    decision.promoted, decision.champion_after = True, decision.challenger
    decision.reason, decision.reason_code = reason, reason_code
    return decision


def _compare(cfg, storage, run_id, organ, plan, champion_version):
    """Score the champion on tonight's test split, pair it with the challenger's."""
    import keras

    from organtrain import evaluate
    from organtrain.train import predict_split

    index = load_dataset(storage, plan["dataset"], plan["dataset_version"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        storage.download(registry.model_key(organ, champion_version.version), path)
        model = keras.models.load_model(path)
    y_true, y_prob, hashes, keys = predict_split(
        model, storage, index, organ, "test",
        image_size=champion_version.settings["input"]["image_size"], batch_size=64,
        cache_dir=cfg.input.cache_dir,
    )  # fmt: skip
    champion = evaluate.predictions_table(
        y_true, y_prob, index.diagnoses(organ), sha256=hashes, source_keys=keys,
        run_id=run_id, organ=organ, model=champion_version.model, split="test",
    )  # fmt: skip
    challenger = read_parquet(
        storage.get_bytes(join_key("runs", run_id, organ, "metrics/predictions.parquet"))
    )
    return stats.compare_predictions(
        champion, challenger, metric=cfg.nightly.metric, alpha=cfg.nightly.alpha
    )


def _read_history(storage: Storage) -> list[dict]:
    try:
        return read_parquet(storage.get_bytes(HISTORY)).to_pylist()
    except ObjectNotFoundError:
        return []


def _append_history(storage: Storage, run_id: str, decisions: list[Decision]) -> pa.Table:
    """Tonight's rows replace any an earlier attempt of tonight wrote: one row per organ
    per night, however often the night is run."""
    with _history_lock(storage):  # nights and `organtrain models` both add rows
        rows = [r for r in _read_history(storage) if r["run_id"] != run_id]
        rows += [asdict(d) for d in decisions]
        rows.sort(key=lambda r: (r["night"], r["run_id"], r["organ"]))
        table = pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
        storage.put_bytes(HISTORY, parquet_bytes(table))
    return table


class HistoryBusy(LockHeld):
    """Another process kept the history's lock longer than a write takes."""


@contextlib.contextmanager
def _history_lock(storage: Storage, wait_s: float = 60.0):
    """`nightly/locks/history.json` around a read-modify-write of the history, so that
    a promotion by hand during a night does not drop the night's rows or its own. A
    write takes a second: a second writer waits for it rather than exiting."""
    lock = StorageLock(
        storage, join_key("nightly", "locks", "history.json"), what="the nightly history",
        stale_after=120, error=HistoryBusy,
    )  # fmt: skip
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.__enter__()
            break
        except HistoryBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


# History rows written by `organtrain models`, not by a night.
BY_HAND = ("forced", "rolled_back")


def promote_by_hand(
    storage: Storage, organ: str, version: str, *, metric: str, reason: str
) -> registry.Champion:
    """`organtrain models promote` and `models register --promote`: make `version` the
    champion and add a `forced` row to the history, so the history tells every change of
    champion, not only the nightly's."""
    before = registry.champion(storage, organ)
    after = registry.promote(storage, organ, version, reason=reason, reason_code="forced")
    _record_by_hand(storage, before, after, metric)
    return after


def roll_back_by_hand(storage: Storage, organ: str, *, metric: str) -> registry.Champion:
    """`organtrain models rollback`: the previous champion again, as a `rolled_back` row."""
    before = registry.champion(storage, organ)
    reason = "rolled back by hand (organtrain models rollback)"
    after = registry.rollback(storage, organ, reason=reason)
    _record_by_hand(storage, before, after, metric)
    return after


def _record_by_hand(storage, before, after, metric: str) -> None:
    if before is not None and before.version == after.version:
        return  # promoting the champion again changes nothing: no row
    now = datetime.now(timezone.utc)
    new = registry.get_version(storage, after.organ, after.version)
    old = registry.get_version(storage, after.organ, before.version) if before else None
    row = Decision(
        night=now.date().isoformat(), run_id=f"by-hand-{now:%Y%m%dT%H%M%S.%fZ}",
        organ=after.organ, dataset_version=new.dataset_version, fingerprint=new.fingerprint,
        changed=False, change="changed by hand", trained=False, metric=metric,
        champion_before=before.version if before else None,
        # Each version's own test figure (their test splits may differ: no diff is given).
        champion_value=old.test_metrics.get(metric, math.nan) if old else math.nan,
        challenger=after.version, challenger_value=new.test_metrics.get(metric, math.nan),
        promoted=True, champion_after=after.version, reason=after.reason,
        reason_code=after.reason_code or "forced",
    )  # fmt: skip
    _append_history(storage, row.run_id, [row])


def trend_table(history: pa.Table) -> pa.Table:
    """The history in the report's long form: per night and organ, the champion's metric
    after the night and the challenger's, with the decision."""
    rows = []
    for r in history.to_pylist():
        challenger = _num(r["challenger_value"])
        after = challenger if r["promoted"] else _num(r["champion_value"])
        common = {"night": r["night"], "organ": r["organ"], "decision": r["reason"]}
        if r["trained"] and not math.isnan(challenger):
            rows.append({**common, "metric": f"challenger {r['metric']}", "value": challenger})
        if not math.isnan(after):
            rows.append({**common, "metric": f"champion {r['metric']}", "value": after})
    return pa.Table.from_pylist(rows) if rows else pa.table({"night": [], "organ": []})


def _report(storage: Storage, run_id: str, history: pa.Table) -> str | None:
    from organtrain.report import build_report

    status_key = join_key("runs", run_id, "status.json")
    if not storage.exists(status_key):
        # Nothing was trained tonight, so no sweep wrote the run's status: record that the
        # night finished, so the report (history only) and `organtrain status` find it.
        status = {"run_id": run_id, "updated": datetime.now(timezone.utc).isoformat(),
                  "state": "finished", "organs": {}}  # fmt: skip
        storage.put_bytes(status_key, json.dumps(status).encode())
    try:
        return storage.url(build_report(storage, run_id, history=trend_table(history)))
    except Exception as err:  # the decisions are made and saved; the report can be rebuilt
        log.warning("the report could not be written (%s: %s)", type(err).__name__, err)
        return None


def NightLock(storage: Storage, run_id: str, *, stale_after: float) -> StorageLock:
    """`nightly/locks/<run_id>.json`: one nightly per night (see `storage.lock`)."""
    return StorageLock(
        storage, join_key("nightly", "locks", f"{run_id}.json"),
        what=f"the nightly for {run_id}", stale_after=stale_after, error=NightlyRunning,
    )  # fmt: skip
