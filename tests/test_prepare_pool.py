"""Shards shared across versions (#13 item 2): the dataset's content-addressed shard pool.

A new version lists the previous version's shards whose records are unchanged and writes
new shards for the rest only; another organ's shards are not written again; earlier
versions still verify (every shard fetched against its sha256, `prepare --repair`); the
same history gives the same shards; and a version of an older format, which owns its
shards, stays readable and is followed by a version in the pool.
"""

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import make_tree, run

from organtrain.config import PrepareConfig
from organtrain.data import leakage, neardup
from organtrain.data.cache import local_shard
from organtrain.data.dataset import (
    fetch_shard,
    load_dataset,
    read_manifest,
    shard_object_key,
    signatures_key,
)
from organtrain.data.manifest import read_parquet
from organtrain.data.prepare import repair
from organtrain.data.shards import (
    MAX_SMALL_SHARDS,
    ExistingShard,
    plan_split,
    read_shard,
    shard_key,
)
from organtrain.storage import LocalStorage, open_storage

CFG = PrepareConfig(
    dataset="t",
    test_fraction=0.25,
    val_fraction=0.2,
    min_images_per_diagnosis=5,
    max_image_side=32,
    images_per_shard=8,
    workers=2,
)
ORGANS = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}


def add_images(src: Path, tmp: Path, organ: str, per_diagnosis: int, seed: int) -> None:
    """Tonight's delivery: `per_diagnosis` new images in each of `organ`'s diagnoses."""
    extra = make_tree(tmp / f"extra-{seed}", per_diagnosis=per_diagnosis, seed=seed,
                      organs={organ: ORGANS[organ]})  # fmt: skip
    for path in extra.rglob("*.png"):
        shutil.copy(path, src / path.relative_to(extra).with_name(f"new{seed}_{path.name}"))


def pool_files(store: Path) -> dict[str, int]:
    """Every object of the shard pool, with its modification time."""
    pool = store / "datasets" / "t" / "shards"
    return {p.relative_to(pool).as_posix(): p.stat().st_mtime_ns for p in pool.rglob("*.tfrecord")}


def verify_every_shard(dest: LocalStorage, version: str, tmp: Path) -> int:
    """Fetch every shard of `version` against its recorded sha256; check each record's
    image is the one the manifest puts there. Returns the images read."""
    index = load_dataset(dest, "t", version)
    manifest = read_parquet(dest.get_bytes(f"datasets/t/{version}/manifest.parquet")).to_pylist()
    placed = {(r["organ"], r["sha256"]): r["shard"] for r in manifest}
    images = 0
    for shard in index.shards:
        records = list(read_shard(fetch_shard(dest, index, shard, tmp / "verify.tfrecord")))
        assert len(records) == shard.images
        assert all(placed[(shard.organ, r.sha256)] == shard.key for r in records)
        images += len(records)
    return images


def test_plan_split_keeps_unchanged_shards_and_writes_the_rest_anew():
    records = {f"{n:02d}": ("label", n) for n in range(20)}
    fresh = plan_split(records, [], images_per_shard=8)
    assert [len(p.members) for p in fresh] == [7, 6, 7] and not any(p.reuse for p in fresh)
    assert [sha for p in fresh for sha in p.members] == sorted(records)

    shards = [ExistingShard(f"s{i}", {sha: records[sha] for sha in p.members})
              for i, p in enumerate(fresh)]  # fmt: skip
    grown = {**records, "20": ("label", 20), "21": ("label", 21)}
    plan = plan_split(grown, shards, images_per_shard=8)
    assert [(p.reuse, p.members) for p in plan[:3]] == [
        (f"s{i}", fresh[i].members) for i in range(3)
    ]
    assert [(p.reuse, p.members) for p in plan[3:]] == [(None, ["20", "21"])]

    # A removed image, or one whose record changed (here its label), and its shard is not
    # kept: the shard's other images are written again, with the new ones.
    changed = {k: v for k, v in grown.items() if k != "00"} | {"10": ("other label", 10)}
    plan = plan_split(changed, shards, images_per_shard=8)
    assert [p.reuse for p in plan] == ["s2", None, None]
    plan = plan_split({k: v for k, v in grown.items() if k != "00"}, shards, images_per_shard=8)
    assert [p.reuse for p in plan] == ["s1", "s2", None]
    assert plan[2].members == sorted(set(fresh[0].members) - {"00"} | {"20", "21"})


def test_small_shards_merge_once_they_fill_half_a_shard_or_are_too_many():
    big = {f"b{n:02d}": ("label", n) for n in range(40)}
    shards = [ExistingShard("big", big)]
    # Each night adds a small shard (images_per_shard 64: fewer than 32 images is small).
    nights = [ExistingShard(f"n{i}", {f"x{i}": ("label", i)}) for i in range(MAX_SMALL_SHARDS)]
    records = {**big, **{f"x{i}": ("label", i) for i in range(MAX_SMALL_SHARDS)}}
    plan = plan_split(records, shards + nights, images_per_shard=64)
    assert [p.reuse for p in plan] == ["big"] + [f"n{i}" for i in range(MAX_SMALL_SHARDS)]
    # One more is too many: the small ones (not the full one) become one shard.
    plan = plan_split({**records, "y": ("label", 99)}, shards + nights, images_per_shard=64)
    assert [p.reuse for p in plan] == ["big", None]
    assert plan[1].members == sorted([f"x{i}" for i in range(MAX_SMALL_SHARDS)] + ["y"])

    # Small shards that together fill half a shard are merged at once.
    twenty = {f"s{n:02d}": ("label", n) for n in range(20)}
    shards.append(ExistingShard("twenty", twenty))
    eleven = {f"t{n:02d}": ("label", n) for n in range(11)}
    plan = plan_split({**big, **twenty, **eleven}, shards, images_per_shard=64)
    assert [(p.reuse, len(p.members)) for p in plan] == [("big", 40), ("twenty", 20), (None, 11)]
    twelve = {**eleven, "t11": ("label", 11)}
    plan = plan_split({**big, **twenty, **twelve}, shards, images_per_shard=64)
    assert [(p.reuse, len(p.members)) for p in plan] == [("big", 40), (None, 32)]


@dataclass
class History:
    """Three versions of one tree, prepared into two stores alike: the first version; 3 new
    images per lung diagnosis; one lung image deleted."""

    src: Path
    stores: list[Path]
    versions: list[str]
    pools: list[dict[str, int]]  # the first store's pool after each version
    deleted: dict  # the manifest row (of the second version) of the deleted image

    def index(self, n: int, store: int = 0):
        return load_dataset(LocalStorage(self.stores[store]), "t", self.versions[n])


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> History:
    tmp = tmp_path_factory.mktemp("pool")
    src = make_tree(tmp / "src", organs=ORGANS)
    h = History(src, [tmp / "store", tmp / "again"], [], [], {})

    def prepare_both() -> None:
        versions = {run(src, store, CFG).version for store in h.stores}
        assert len(versions) == 1
        h.versions.append(versions.pop())
        h.pools.append(pool_files(h.stores[0]))

    prepare_both()
    add_images(src, tmp, "lung", per_diagnosis=3, seed=11)
    prepare_both()
    # An image of a full lung training shard of the first version goes.
    dest = LocalStorage(h.stores[0])
    full = {s.key for s in h.index(0).shards_for("lung", "train") if s.images >= 6}
    rows = read_parquet(dest.get_bytes(f"datasets/t/{h.versions[1]}/manifest.parquet"))
    h.deleted = next(r for r in rows.to_pylist() if r["shard"] in full and not r["duplicate_of"])
    (src / h.deleted["key"]).unlink()
    prepare_both()
    return h


def test_adding_images_to_one_organ_writes_no_shard_of_another(history):
    first, second = history.index(0), history.index(1)
    written = set(history.pools[1]) - set(history.pools[0])
    assert written and all(key.startswith("lung/") for key in written), written
    # Nothing already in the pool was written again, and colon lists the same shards.
    assert {key: history.pools[1][key] for key in history.pools[0]} == history.pools[0]
    for split in ("train", "val", "test"):
        assert second.shards_for("colon", split) == first.shards_for("colon", split)
        # The existing lung shards keep their images; the new images go into new shards.
        assert set(first.shards_for("lung", split)) <= set(second.shards_for("lung", split))
    new = [s for s in second.shards if s.key not in {s.key for s in first.shards}]
    assert {f"shards/{key}" for key in written} == {s.key for s in new}
    assert sum(s.images for s in new) == 6 == second.images - first.images
    assert len(new) <= 3  # one small shard per split that received images


def test_deleting_an_image_rewrites_only_its_shard(history):
    second, third = history.index(1), history.index(2)
    dropped = [s for s in second.shards if s not in third.shards]
    added = [s for s in third.shards if s not in second.shards]
    assert [s.key for s in dropped] == [history.deleted["shard"]]
    assert len(added) == 1 and added[0].images == dropped[0].images - 1
    assert set(history.pools[2]) - set(history.pools[1]) == {added[0].key.removeprefix("shards/")}


def test_the_same_history_gives_the_same_shards(history):
    for n in range(3):
        assert history.index(n, store=0).shards == history.index(n, store=1).shards
    assert pool_files(history.stores[0]).keys() == pool_files(history.stores[1]).keys()


def test_every_version_still_verifies_and_repair_fixes_a_shared_shard(history, tmp_path):
    store = shutil.copytree(history.stores[0], tmp_path / "store")  # free to damage
    dest = LocalStorage(store)
    for n, images in enumerate((80, 86, 85)):
        assert verify_every_shard(dest, history.versions[n], tmp_path) == images
    result = repair(LocalStorage(history.src), dest, CFG, version=history.versions[0],
                    progress=False)  # fmt: skip
    assert result.rewritten == [] and result.shards == len(history.index(0).shards)

    # A colon shard all three versions list is lost; repairing the first version rewrites
    # it, byte for byte, and so repairs the others too.
    shared = history.index(0).shards_for("colon", "train")[0]
    assert all(shared in history.index(n).shards for n in range(3))
    (store / shard_object_key(history.index(0), shared)).unlink()
    result = repair(LocalStorage(history.src), dest, CFG, version=history.versions[0],
                    progress=False)  # fmt: skip
    assert result.rewritten == [shared.key]
    assert verify_every_shard(dest, history.versions[2], tmp_path) == 85


def test_versions_share_pool_shards_in_s3_and_in_the_node_cache(tmp_path, s3_uri, monkeypatch):
    monkeypatch.setenv("ORGANTRAIN_CACHE_DIR", str(tmp_path / "node-cache"))
    src = make_tree(tmp_path / "src", organs=ORGANS)
    dest = open_storage(f"{s3_uri}/store")
    first = run(src, dest, CFG)
    assert first.organs == ORGANS
    before = {info.key: info.version_tag for info in dest.list("datasets/t/shards")}
    add_images(src, tmp_path, "lung", per_diagnosis=2, seed=12)
    second = run(src, dest, CFG)
    after = {info.key: info.version_tag for info in dest.list("datasets/t/shards")}
    assert {k: after[k] for k in before} == before  # no object rewritten (same ETags)
    assert all(k.startswith("datasets/t/shards/lung/") for k in set(after) - set(before))

    # A trial of the first version, then one of the second: the shared shard is one file
    # on the node, downloaded once.
    one, two = (load_dataset(dest, "t", r.version) for r in (first, second))
    shard = one.shards_for("colon", "train")[0]
    assert shard in two.shards
    cached = local_shard(dest, one, shard)
    assert cached.downloaded
    assert local_shard(dest, two, shard) == replace(cached, downloaded=False)
    assert cached.path == tmp_path / "node-cache" / "t" / shard.key


def as_format_2(store: Path, version: str) -> None:
    """Rewrite a version as organtrain wrote it before the pool (format 2): its own shards
    under its folder, shards/<organ>/<split>-NNNNN-of-MMMMM.tfrecord."""
    base = store / "datasets" / "t"
    index = json.loads((base / version / "dataset.json").read_text())
    by_split = defaultdict(list)
    for entry in index["shards"]:
        by_split[(entry["organ"], entry["split"])].append(entry)
    renamed = {}
    for (organ, split), entries in by_split.items():
        for n, entry in enumerate(entries):
            key = shard_key(organ, split, n, len(entries))
            (base / version / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(base / entry["key"], base / version / key)
            renamed[entry["key"]], entry["key"] = key, key
    shutil.rmtree(base / "shards")
    (base / version / "dataset.json").write_text(json.dumps({**index, "format": 2}))
    path = base / version / "manifest.parquet"
    table = pq.read_table(path)
    shards = pa.array([renamed[k] for k in table.column("shard").to_pylist()])
    pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", shards), path)
    latest = json.loads((base / "LATEST.json").read_text())
    (base / "LATEST.json").write_text(json.dumps({**latest, "listing": None}))


def test_a_version_that_owns_its_shards_stays_readable_and_is_followed(tmp_path):
    src = make_tree(tmp_path / "src", organs=ORGANS)
    store = tmp_path / "store"
    old = run(src, store, CFG).version
    as_format_2(store, old)
    dest = LocalStorage(store)
    index = load_dataset(dest, "t", old)
    assert index.format == 2 and verify_every_shard(dest, old, tmp_path) == 80
    shard = index.shards[0]
    assert local_shard(dest, index, shard).path == store / "datasets" / "t" / old / shard.key
    assert repair(LocalStorage(src), dest, CFG, version=old, progress=False).rewritten == []

    add_images(src, tmp_path, "lung", per_diagnosis=2, seed=13)
    new = run(src, store, CFG).version
    index = load_dataset(dest, "t", new)
    assert index.format == 3
    # Nothing of the old version is listed: its shards are its own, not in the pool.
    assert all((store / shard_object_key(index, s)).parent.parent.name == "shards"
               for s in index.shards)  # fmt: skip
    assert verify_every_shard(dest, new, tmp_path) == 84
    assert verify_every_shard(dest, old, tmp_path) == 80


def test_signatures_are_kept_beside_the_shards_not_in_each_manifest(history, monkeypatch):
    dest = LocalStorage(history.stores[0])
    first, second = history.index(0), history.index(1)
    raw = read_parquet(dest.get_bytes(f"datasets/t/{second.version}/manifest.parquet"))
    assert "signature" not in raw.column_names
    signatures = [
        {(r["organ"], r["sha256"]): r["signature"] for r in read_manifest(dest, i).to_pylist()}
        for i in (first, second)
    ]
    assert all(len(s) > 100 for s in signatures[1].values())
    assert all(signatures[1][image] == s for image, s in signatures[0].items())
    # The leakage check reads them from the pool, not from the shards' images.
    monkeypatch.setattr(leakage, "_signatures_from_shards", None)
    assert leakage.check_version(dest, second).clean

    # A signature table lost: the manifest is read without the column, as one of format 1
    # (the leakage check then computes them from the images; prepare reads every file).
    lost = (
        history.stores[0]
        / "datasets"
        / "t"
        / signatures_key(second.shards[0].key, neardup.SIGNATURE_METHOD)
    )
    copy = lost.read_bytes()
    lost.unlink()
    try:
        assert "signature" not in read_manifest(dest, second).column_names
    finally:
        lost.write_bytes(copy)
