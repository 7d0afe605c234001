"""The `organtrain` command line: demo, synth, prepare, leakage, train, sweep, nightly,
predict, models, datasets, report, status, tensorboard."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time

from organtrain import console
from organtrain.config import RunConfig, load_config
from organtrain.errors import ConfigError, OrgantrainError
from organtrain.signals import interrupt_on


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with console.configured(args.verbose):  # quiet unless -v (organtrain.console)
        return _run(args)


def _run(args) -> int:
    try:
        with interrupt_on(signal.SIGTERM):  # preemption, scancel: exit 130, locks released
            code = args.run(args)
    except OrgantrainError as err:
        print(f"organtrain: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("organtrain: interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    return code or 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="organtrain", description=__doc__)
    _add_verbose_arg(parser, default=0)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run the whole pipeline on synthetic data, locally")
    _add_storage_arg(demo)
    _add_config_args(demo, default="jobs/demo.yaml")
    demo.set_defaults(run=_run_demo)

    synth = commands.add_parser("synth", help="write a synthetic histology-like image tree")
    synth.add_argument(
        "--out", required=True, help="folder to write <organ>/<diagnosis>/*.png into"
    )
    synth.add_argument("--images-per-diagnosis", type=int, default=60)
    synth.add_argument("--image-size", type=int, default=64, help="pixels (square)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_verbose_arg(synth)
    synth.set_defaults(run=_run_synth)

    prep = commands.add_parser(
        "prepare",
        help="scan an image tree into a manifest, split and shards",
        description="Writes a new dataset version from an image tree, or finds it already "
        "there. --repair re-verifies a published version's shards and rewrites missing or "
        "damaged ones from the source. Exit status: 0 done, 2 bad input, 3 another prepare "
        "of this dataset is running.",
    )
    prep.add_argument(
        "source", nargs="?", help="folder or s3://bucket/prefix (default: prepare.source)"
    )
    prep.add_argument(
        "--dest", help="storage root, folder or s3://bucket/prefix (default: storage.uri)"
    )
    prep.add_argument("--dataset", help="dataset name (default: prepare.dataset)")
    prep.add_argument(
        "--repair", action="store_true",
        help="verify every shard of a published version against its recorded sha256 and "
        "rewrite the missing or damaged ones from the source",
    )  # fmt: skip
    prep.add_argument("--version", help="with --repair: the version (default: the latest)")
    prep.add_argument(
        "--address",
        help="Ray cluster address: check the images and write the shards in Ray tasks on the "
        "cluster's nodes; the source and the destination must be storage every node reaches "
        "(s3:// or a folder shared at the same path). Default: resources.address, else "
        "RAY_ADDRESS, else threads on this machine (prepare.workers)",
    )  # fmt: skip
    prep.add_argument(
        "--rehash", action="store_true",
        help="read, hash and decode every source file again, instead of reusing what the "
        "latest version recorded for files whose size and modification time (S3: ETag) are "
        "unchanged (prepare.rehash)",
    )  # fmt: skip
    _add_config_args(prep, default=None)
    prep.set_defaults(run=_run_prepare)

    leak = commands.add_parser(
        "leakage",
        help="check a prepared dataset version: no group or near-duplicate across splits",
        description="Recomputes, from a dataset version's manifest and image signatures, "
        "the patient/slide groups, identical files and near-duplicate pairs that straddle two "
        "splits (prepare runs the same check before publishing). Exit status: 0 none, "
        "1 leakage found, 2 bad input.",
    )
    leak.add_argument("--dataset", help="dataset name (default: prepare.dataset)")
    leak.add_argument("--version", help="dataset version (default: the latest)")
    _add_storage_arg(leak)
    _add_config_args(leak, default=None)
    leak.set_defaults(run=_run_leakage)

    train = commands.add_parser("train", help="train one organ's model (resumes if interrupted)")
    train.add_argument("--organ", required=True, help="organ to train, e.g. lung")
    train.add_argument(
        "--run-id", help="results go to <storage>/runs/<run-id>/<organ> (default: name)"
    )
    _add_storage_arg(train)
    _add_config_args(train, default=None)
    train.set_defaults(run=_run_train)

    sweep = commands.add_parser(
        "sweep",
        help="a Ray Tune search per organ, all organs at once (resumes if interrupted)",
        description="Searches every organ's model at once on a Ray cluster. Exit status: 0 "
        "every organ finished, 1 some organ failed, 2 bad input, 130 interrupted "
        "(SIGINT, SIGTERM, SIGUSR1): run the same command again to continue.",
    )
    sweep.add_argument(
        "--run-id", help="results go to <storage>/runs/<run-id>/ (default: the config's name)"
    )
    sweep.add_argument(
        "--address",
        help="Ray cluster address (default: resources.address, else RAY_ADDRESS, else a "
        "Ray started on this machine for this command)",
    )
    _add_storage_arg(sweep)
    _add_config_args(sweep, default=None)
    sweep.set_defaults(run=_run_sweep)

    night = commands.add_parser(
        "nightly",
        help="prepare new images, retrain changed organs, promote better models",
        description="One night of retraining, keyed by its date: prepare, find changed "
        "organs, sweep them, compare each challenger with the champion on the same test "
        "images, promote by the nightly rule, record the history, write the report. Exit "
        "status: 0 done, 1 some organ failed, 2 bad input, 3 another nightly for this date "
        "is running, 130 interrupted (run it again to continue).",
    )
    night.add_argument("--date", help="the night, YYYY-MM-DD (default: today, UTC)")
    night.add_argument("--run-id", help="default: nightly-<date>")
    night.add_argument("--address", help="Ray cluster address (see `organtrain sweep`)")
    _add_storage_arg(night)
    _add_config_args(night, default=None)
    night.set_defaults(run=_run_nightly)

    _add_predict_parser(commands)

    models = commands.add_parser("models", help="the model registry: versions and champions")
    models_commands = models.add_subparsers(required=True, metavar="ACTION")
    _add_model_use_parsers(models_commands)
    for name, helptext in (
        ("list", "every organ's champion and number of versions"),
        ("show", "one organ's versions, its champion marked"),
        ("promote", "make a version the organ's champion"),
        ("rollback", "make the previous champion the champion again"),
    ):
        action = models_commands.add_parser(name, help=helptext)
        if name != "list":
            action.add_argument("organ", metavar="ORGAN")
        if name == "promote":
            action.add_argument("version", metavar="VERSION")
        _add_storage_arg(action)
        _add_config_args(action, default=None)
        action.set_defaults(run=_run_models, action=name)

    _add_datasets_parser(commands)

    report = commands.add_parser(
        "report", help="write runs/RUN/report.html: one self-contained page of a run's results"
    )
    report.add_argument("run_id", metavar="RUN", help="run id (a folder under <storage>/runs/)")
    _add_storage_arg(report)
    report.add_argument(
        "--history", help="key of a nightly history Parquet table in the storage (trends)"
    )
    _add_config_args(report, default=None)
    report.set_defaults(run=_run_report)

    status = commands.add_parser(
        "status",
        help="where a run stands: organs, trials, best metric so far, errors",
        description="Prints a run's state as a table; reads only the storage, so it works "
        "while the run goes on elsewhere. Exit status: 0 the table was printed (whatever the "
        "run's state: failed organs are in the table), 2 no such run or bad input.",
    )
    status.add_argument("run_id", metavar="RUN", help="run id (a folder under <storage>/runs/)")
    _add_storage_arg(status)
    _add_config_args(status, default=None)
    status.set_defaults(run=_run_status)

    board = commands.add_parser(
        "tensorboard",
        help="copy a run's TensorBoard logs to a local folder, for `tensorboard --logdir`",
        description="Copies the event files of every organ and trial of RUN (written each "
        "epoch to <storage>/runs/RUN/<organ>/tensorboard/) to OUT, where a stock TensorBoard "
        "reads them, whatever the storage (TensorBoard cannot read s3:// without "
        "tensorflow-io). Run it again to bring the copy up to date.",
    )
    board.add_argument("run_id", metavar="RUN", help="run id (a folder under <storage>/runs/)")
    board.add_argument("--out", help="local folder (default: tensorboard-logs/RUN)")
    _add_storage_arg(board)
    _add_config_args(board, default=None)
    board.set_defaults(run=_run_tensorboard)
    return parser


def _add_datasets_parser(commands) -> None:
    datasets = commands.add_parser(
        "datasets",
        help="a prepared dataset's versions, and removing old ones (gc)",
        description="`list` shows each version of a dataset, newest first, and what keeps "
        "it. `gc` removes the versions beyond the --keep newest (never the latest, never one "
        "a registered model was trained on) and the pool shards no kept version lists. "
        "Exit status: 0 done, 2 bad input, 3 a prepare of this dataset is running.",
    )
    actions = datasets.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the dataset's versions, newest first")
    gc = actions.add_parser("gc", help="remove versions not kept, and unlisted pool shards")
    gc.add_argument("--keep", type=int, default=None,
                    help="how many of the newest versions to keep (default 3)")  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    for action, name in ((listing, "list"), (gc, "gc")):
        action.add_argument("--dataset", help="dataset name (default: prepare.dataset)")
        _add_storage_arg(action)
        _add_config_args(action, default=None)
        action.set_defaults(run=_run_datasets, action=name)


def _run_datasets(args) -> None:
    from organtrain.data import retention

    cfg = load_config(args.config, args.overrides)
    storage = _storage(cfg, args.storage or cfg.storage.uri)
    dataset = args.dataset or cfg.prepare.dataset
    if args.action == "list":
        versions = retention.dataset_versions(storage, dataset)
        kept = retention.kept_versions(versions, retention.DEFAULT_KEEP)
        for v in versions:
            if v.index is None:
                print(f"  {v.version}  incomplete (no dataset.json), {v.own_bytes} bytes")
                continue
            models = f"; models: {', '.join(v.models)}" if v.models else ""
            runs = f"; read by running {', '.join(v.runs)}" if v.runs else ""
            print(f"{'*' if v.latest else ' '} {v.version}  {v.created_at}  {v.index.images} "
                  f"images, {len(v.index.shards)} shards, format {v.index.format}"
                  f"{models}{runs}{'' if v.version in kept else '; gc removes it'}")  # fmt: skip
        return
    keep = retention.DEFAULT_KEEP if args.keep is None else args.keep
    result = retention.gc(storage, dataset, keep=keep, dry_run=args.dry_run)
    verb = "would remove" if result.dry_run else "removed"
    print(f"dataset {dataset}: {verb} {len(result.removed)} version(s) and "
          f"{len(result.shards_removed)} pool shard(s), {result.bytes_freed} bytes")  # fmt: skip
    for version in result.removed:
        print(f"  {verb}: {version}")
    for version, why in sorted(result.kept.items()):
        print(f"  kept: {version} ({why})")


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser(
        "predict",
        help="classify new images with each organ's model (resumes if interrupted)",
        description="Classifies an image tree (<organ>/..., every organ with its own model), "
        "a folder of one organ's images (--organ), an s3:// prefix, or the keys listed in "
        "--keys. Images are decoded, cropped and resized exactly as `prepare` and training "
        "did. Writes OUT/predictions.parquet, OUT/rejected.parquet (files that could not be "
        "read, with the reason) and OUT/summary.json. Exit status: 0 done, 2 bad input, "
        "3 another predict is writing to OUT, 130 interrupted (run it again to continue).",
    )
    predict.add_argument("source", metavar="SOURCE", help="folder or s3://bucket/prefix")
    predict.add_argument("--out", required=True, help="folder or s3:// prefix for the tables")
    predict.add_argument("--organ", help="classify every image with this organ's model")
    which = predict.add_mutually_exclusive_group()
    which.add_argument("--version", help="a registry version (default: the champion)")
    which.add_argument("--run", dest="from_run", metavar="RUN",
                       help="use the model a `train`/`sweep` run published")  # fmt: skip
    predict.add_argument("--keys", help="text file of keys under SOURCE, one a line")
    predict.add_argument("--chunk-images", type=int, default=256,
                         help="images per chunk, the unit of resumption (default 256)")  # fmt: skip
    predict.add_argument("--workers", type=int,
                         help="Ray actors (default: in this process for small inputs)")  # fmt: skip
    predict.add_argument("--address", help="Ray cluster address (see `organtrain sweep`)")
    _add_storage_arg(predict)
    _add_config_args(predict, default=None)
    predict.set_defaults(run=_run_predict)


def _add_model_use_parsers(models_commands) -> None:
    register = models_commands.add_parser(
        "register", help="register the model a `train` run or a sweep published, with its card"
    )
    register.add_argument("run_id", metavar="RUN")
    register.add_argument("organ", metavar="ORGAN")
    register.add_argument("--promote", action="store_true", help="make it the champion too")
    export = models_commands.add_parser(
        "export",
        help="write a TensorFlow SavedModel (TF Serving layout) that needs no organtrain",
    )
    export.add_argument("organ", metavar="ORGAN")
    export.add_argument("version", metavar="VERSION", nargs="?", help="default: the champion")
    export.add_argument("--out", required=True, help="folder or s3:// prefix: OUT/<n>/ is new")
    for action, name in ((register, "register"), (export, "export")):
        _add_storage_arg(action)
        _add_config_args(action, default=None)
        action.set_defaults(run=_run_model_use, action=name)


def _run_predict(args) -> None:
    from organtrain.predict import predict

    cfg = load_config(args.config, args.overrides)
    keys = None
    if args.keys:
        try:
            with open(args.keys) as f:
                keys = [line.strip() for line in f if line.strip()]
        except OSError as err:
            raise ConfigError(f"--keys {args.keys}: {err.strerror}") from None
    outcome = predict(
        _storage(cfg, args.source), _storage(cfg, args.out),
        models=_storage(cfg, args.storage or cfg.storage.uri), organ=args.organ,
        version=args.version, run=args.from_run, keys=keys, chunk_images=args.chunk_images,
        workers=args.workers, address=args.address, ray_cfg=cfg, progress=not args.no_progress,
    )  # fmt: skip
    done = " (already done)" if outcome.already_done else ""
    print(f"classified {outcome.classified} of {outcome.images} image(s){done}; "
          f"{outcome.rejected} could not be read")  # fmt: skip
    for organ, version in outcome.models.items():
        counts = outcome.predicted.get(organ, {})
        shown = ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) or "none"
        print(f"  {organ} (model {version}): {shown}")
    if outcome.rejected:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(outcome.rejected_reasons.items()))
        print(f"  unreadable: {reasons}; rejected.parquet lists each file")
    if outcome.chunks_reused:
        print(f"  {outcome.chunks_reused} of {outcome.chunks} chunk(s) were done by an "
              "earlier, interrupted run")  # fmt: skip
    if not outcome.already_done:
        print(f"  {outcome.images_per_s:.1f} images/s")
    print(f"  {outcome.out}")


def _run_model_use(args) -> None:
    from organtrain import registry

    cfg = load_config(args.config, args.overrides)
    storage = _storage(cfg, args.storage or cfg.storage.uri)
    if args.action == "register":
        entry = registry.register_run(storage, args.run_id, args.organ)
        print(f"{args.organ}: version {entry.version} registered ({entry.model}, "
              f"{entry.test_images} test images)")  # fmt: skip
        print(f"  {storage.url(registry.version_prefix(args.organ, entry.version))}/")
        if args.promote:
            from organtrain.nightly import promote_by_hand

            reason = "promoted by hand (organtrain models register --promote)"
            promote_by_hand(storage, args.organ, entry.version, metric=cfg.nightly.metric,
                            reason=reason)  # fmt: skip
            print(f"{args.organ}: champion is now {entry.version}")
        return
    from organtrain.export import export_version

    where = export_version(storage, args.organ, args.version, _storage(cfg, args.out))
    print(f"{args.organ}: SavedModel written to {where}")


def _add_storage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", help="storage root, folder or s3://bucket/prefix (default: storage.uri)"
    )


def _add_config_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--config", default=default, help="run configuration YAML (see jobs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field (repeatable); VALUE is read as YAML, e.g. --set "
        "train.epochs=5 or --set 'model.filters=[16, 32]' (quote brackets for the shell)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_verbose_arg(parser)


def _add_verbose_arg(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """-v on the command line before or after the command (`organtrain -v sweep` or
    `organtrain sweep -v`); a command's own default is SUPPRESS so that it leaves a -v
    given before it in place."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=default,
        help="more detail: each stage's steps (-v); also the libraries' own logs (-vv)",
    )  # fmt: skip


def _run_synth(args) -> None:
    from organtrain.data.synth import write_synthetic_tree

    n = write_synthetic_tree(
        args.out,
        images_per_diagnosis=args.images_per_diagnosis,
        image_size=args.image_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"synth: {n} images under {args.out}")


def _run_prepare(args) -> None:
    cfg = load_config(args.config, args.overrides)
    changes = {k: v for k, v in (("source", args.source), ("dataset", args.dataset)) if v}
    cfg = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, **changes))
    if args.dest:
        cfg = dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, uri=args.dest))
    if args.rehash and args.repair:
        raise ConfigError("--rehash is for a new version; --repair reads every shard anyway")
    if args.rehash:
        cfg = dataclasses.replace(cfg, prepare=dataclasses.replace(cfg.prepare, rehash=True))
    if args.repair and args.address:
        raise ConfigError("--repair runs on this machine; leave out --address")
    if args.repair:
        _repair(cfg, version=args.version, progress=not args.no_progress)
    elif args.version:
        raise ConfigError("--version names the version to --repair; add --repair")
    else:
        address = args.address or cfg.resources.address or os.environ.get("RAY_ADDRESS")
        _prepare(cfg, progress=not args.no_progress, address=address)


def _repair(cfg: RunConfig, *, version: str | None, progress: bool) -> None:
    from organtrain.data.prepare import repair

    source = _storage(cfg, cfg.prepare.source, setting="prepare.source")
    dest = _storage(cfg, cfg.storage.uri)
    result = repair(source, dest, cfg.prepare, version=version, progress=progress)
    print(f"dataset {result.dataset} version {result.version}: {result.shards} shard(s) verified")
    print(f"  {result.uri}")
    if result.rewritten:
        print(f"  {len(result.rewritten)} of {result.shards} shard(s) were missing or damaged and "
              "were rewritten from the source; each matches its recorded sha256 again")  # fmt: skip
        for key in result.rewritten:
            print(f"  rewritten: {key}")
    else:
        print("  all shards match their recorded sha256; nothing rewritten")


def _run_leakage(args) -> int:
    from organtrain.data.dataset import load_dataset
    from organtrain.data.leakage import check_version

    cfg = load_config(args.config, args.overrides)
    storage = _storage(cfg, args.storage or cfg.storage.uri)
    index = load_dataset(storage, args.dataset or cfg.prepare.dataset, args.version)
    report = check_version(storage, index, progress=not args.no_progress)
    print(f"dataset {index.dataset} version {index.version}: leakage check ({report.method})")
    for organ in report.organs.values():
        print(
            f"  {organ.organ}: {organ.images} images; groups per split "
            + ", ".join(f"{s} {n}" for s, n in organ.groups.items())
            + "; near-duplicate clusters "
            + ", ".join(f"{s} {n}" for s, n in organ.clusters.items())
        )
        print(
            f"    across splits: {organ.cross_split_groups} group(s), {organ.cross_split_copies} "
            f"identical file(s), {organ.cross_split_pairs} near-duplicate pair(s)"
        )
        for leak in organ.leaks:
            print(f"    LEAK {leak['kind']}: {leak['what']}")
        if organ.closest:
            c = organ.closest[0]
            print(f"    closest train/test pair: {c['train_key']} ~ {c['test_key']} "
                  f"(distance {c['distance']:.3g})")  # fmt: skip
    print("no leakage" if report.clean else "LEAKAGE FOUND: " + " | ".join(report.problems()))
    return 0 if report.clean else 1


def _run_train(args) -> None:
    cfg = _with_storage(load_config(args.config, args.overrides), args.storage)
    _train(cfg, args.organ, run_id=args.run_id or cfg.name, progress=not args.no_progress)


def _train(cfg: RunConfig, organ: str, *, run_id: str, progress: bool):
    from organtrain.train import train_organ

    result = train_organ(
        cfg, _storage(cfg, cfg.storage.uri), organ, run_id=run_id, verbose=2 if progress else 0
    )
    print(
        f"{organ}: {result.model} test accuracy {result.test_accuracy:.3f}, macro F1 "
        f"{result.test_macro_f1:.3f} on {result.test_images} test images "
        f"({result.epochs_run} epochs, best {result.best_epoch}, {result.replicas} replica(s); "
        f"{console.duration(result.seconds)})"
    )
    print(f"  {result.uri}")
    return result


def _run_sweep(args) -> int:
    cfg = _with_storage(load_config(args.config, args.overrides), args.storage)
    return _sweep(cfg, run_id=args.run_id, address=args.address, progress=not args.no_progress)


def _sweep(cfg: RunConfig, *, run_id: str | None, address: str | None, progress: bool) -> int:
    from organtrain.search.sweep import sweep

    started = time.monotonic()
    outcome = sweep(cfg, run_id=run_id, address=address, progress=progress)
    print(f"sweep {outcome.run_id}: {len(outcome.rows) - len(outcome.failed)} of "
          f"{len(outcome.rows)} organ(s) finished ({_since(started)})")  # fmt: skip
    for row in outcome.rows:
        if row["state"] == "done":
            # The organ's seconds as summary.parquet and its result.json record them.
            print(
                f"  {row['organ']}: {row['model']} test accuracy {row['test_accuracy']:.3f}, "
                f"macro F1 {row['test_macro_f1']:.3f} on {row['test_images']} images "
                f"(best of {row['trials']} trials, {row['trials_stopped_early']} stopped early; "
                f"{console.duration(row['seconds'])})"
            )
        else:
            print(f"  {row['organ']}: FAILED: {row['error']}")
    print(f"  results: {outcome.uri}")
    if outcome.report:
        print(f"report: {outcome.report}")
    return 0 if outcome.ok else 1


def _run_nightly(args) -> int:
    import datetime

    from organtrain.nightly import nightly

    cfg = _with_storage(load_config(args.config, args.overrides), args.storage)
    try:
        night = datetime.date.fromisoformat(args.date) if args.date else None
    except ValueError:
        raise ConfigError(f"--date {args.date!r}: write the night as YYYY-MM-DD") from None
    outcome = nightly(
        cfg, night=night, run_id=args.run_id, address=args.address, progress=not args.no_progress
    )
    print(f"nightly {outcome.run_id}:")
    for d in outcome.decisions:
        print(f"  {d.organ}: {d.reason}")
    if outcome.report:
        print(f"  report: {outcome.report}")
    return 1 if outcome.failed else 0


def _run_models(args) -> None:
    from organtrain import registry

    cfg = load_config(args.config, args.overrides)
    storage = _storage(cfg, args.storage or cfg.storage.uri)
    if args.action == "list":
        organs = registry.organs(storage)
        if not organs:
            print(f"no models registered in {storage.uri}")
        for organ in organs:
            champion = registry.champion(storage, organ)
            count = len(registry.versions(storage, organ))
            serving = (
                f"champion {champion.version} since {champion.since}" if champion else "no champion"
            )
            print(f"{organ}: {serving}; {count} version(s)")
    elif args.action == "show":
        champion = registry.champion(storage, args.organ)
        found = registry.versions(storage, args.organ)
        if not found:
            raise ConfigError(f"no model versions of {args.organ!r} in {storage.uri}")
        for v in found:
            mark = "*" if champion and champion.version == v.version else " "
            metrics = ", ".join(f"{k} {val:.3f}" for k, val in v.test_metrics.items())
            print(f"{mark} {v.version}  {v.created}  {v.model}  {metrics}  "
                  f"({v.test_images} test images, dataset {v.dataset_version})")  # fmt: skip
        if champion:
            print(f"champion {champion.version}: {champion.reason}")
    elif args.action == "promote":
        from organtrain.nightly import promote_by_hand

        champion = promote_by_hand(
            storage, args.organ, args.version, metric=cfg.nightly.metric,
            reason="promoted by hand (organtrain models promote)",
        )  # fmt: skip
        print(f"{args.organ}: champion is now {champion.version}")
    else:
        from organtrain.nightly import roll_back_by_hand

        champion = roll_back_by_hand(storage, args.organ, metric=cfg.nightly.metric)
        print(f"{args.organ}: champion is now {champion.version} (rolled back)")


def _run_report(args) -> None:
    from organtrain.data.manifest import read_parquet
    from organtrain.report import build_report

    cfg = load_config(args.config, args.overrides)
    storage = _storage(cfg, args.storage or cfg.storage.uri)
    history = read_parquet(storage.get_bytes(args.history)) if args.history else None
    print(storage.url(build_report(storage, args.run_id, history=history)))


def _run_status(args) -> None:
    from organtrain.status import render_status

    cfg = load_config(args.config, args.overrides)
    print(render_status(_storage(cfg, args.storage or cfg.storage.uri), args.run_id))


def _with_storage(cfg: RunConfig, uri: str | None) -> RunConfig:
    """The config with --storage, when given, in place of storage.uri: every part of the
    command (prepare, trials on other nodes, the report) then reads and writes there."""
    if not uri:
        return cfg
    return dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, uri=uri))


def _run_tensorboard(args) -> None:
    from organtrain.tensorboard import download_logs

    cfg = load_config(args.config, args.overrides)
    storage = _storage(cfg, args.storage or cfg.storage.uri)
    out = args.out or os.path.join("tensorboard-logs", args.run_id)
    files = download_logs(storage, args.run_id, out)
    if not files:
        raise ConfigError(
            f"{storage.url(f'runs/{args.run_id}')}/ holds no TensorBoard logs "
            "(<organ>/tensorboard/): check the run id and --storage; runs write them from "
            "their first epoch"
        )
    print(f"{len(files)} event file(s) of run {args.run_id} in {out}")
    print(f"  tensorboard --logdir {out}")


def _storage(cfg: RunConfig, uri: str, setting: str = "storage.uri"):
    from organtrain.storage import open_storage

    return open_storage(
        uri, endpoint_url=cfg.storage.endpoint_url, region=cfg.storage.region, setting=setting
    )


def _run_demo(args) -> int:
    from organtrain.data.synth import write_synthetic_tree

    cfg = _with_storage(load_config(args.config, args.overrides), args.storage)
    s = cfg.synth
    started = time.monotonic()
    images = write_synthetic_tree(
        s.out, organs=s.organs, images_per_diagnosis=s.images_per_diagnosis,
        image_size=s.image_size, seed=s.seed, progress=not args.no_progress,
    )  # fmt: skip
    print(f"synth: {images} images under {s.out} ({_since(started)})")
    _prepare(cfg, progress=not args.no_progress)
    return _sweep(cfg, run_id=None, address=None, progress=not args.no_progress)


def _since(started: float) -> str:
    """The time since `started` (time.monotonic()), as the stage lines show it."""
    return console.duration(time.monotonic() - started)


def _prepare(cfg: RunConfig, *, progress: bool, address: str | None = None):
    """`address`: check images and write shards in Ray tasks on that cluster."""
    from organtrain.data.prepare import prepare

    source = _storage(cfg, cfg.prepare.source, setting="prepare.source")
    dest = _storage(cfg, cfg.storage.uri)
    started = time.monotonic()
    with _ray_executor(cfg, address) as executor:
        result = prepare(source, dest, cfg.prepare, progress=progress, executor=executor)
    state = "written" if result.created else "unchanged, nothing written"
    if result.repaired:
        state = f"already there; repaired {len(result.repaired)} shard(s) that were missing"
    print(f"prepare: dataset {result.dataset} version {result.version} ({state}): "
          f"{result.images} images in {len(result.organs)} organ(s), {result.rejected} "
          f"file(s) rejected ({_since(started)})")  # fmt: skip
    print(f"  {result.uri}")
    if result.tasks_per_node:
        print(f"  {sum(result.tasks_per_node.values())} Ray task(s) on "
              f"{len(result.tasks_per_node)} node(s)")  # fmt: skip
    if console.verbose():
        for organ, diagnoses in result.organs.items():
            print(f"  {organ}: {', '.join(diagnoses)}")
    for item in result.excluded:
        print(f"  left out: {item['reason']}")
    if result.split_changes:
        c = result.split_changes
        print(f"  split changes: {c['images']} of {c['of']} image(s) of version "
              f"{c['from_version']} are in another split now ({c['reason']})")  # fmt: skip
    if result.rejected:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(result.rejected_reasons.items()))
        print(f"  rejected: {reasons}; rejected.parquet in the version folder lists each file")
    return result


@contextlib.contextmanager
def _ray_executor(cfg: RunConfig, address: str | None):
    """RayTasks on the cluster at `address` (None: no executor, prepare's threads); Ray is
    disconnected afterwards if this call connected it."""
    if not address:
        yield None
        return
    import ray

    from organtrain.data.executors import RayTasks
    from organtrain.search.sweep import _connect

    connected_here = not ray.is_initialized()
    _connect(address, cfg)
    try:
        yield RayTasks()
    finally:
        if connected_here:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
