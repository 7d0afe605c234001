"""`prepare` end to end on small synthetic trees: local storage, and S3 on SeaweedFS."""

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from organtrain.cli import main
from organtrain.config import PrepareConfig
from organtrain.data.dataset import fetch_shard, load_dataset, read_manifest, shard_object_key
from organtrain.data.manifest import read_parquet
from organtrain.data.prepare import prepare
from organtrain.data.shards import read_shard
from organtrain.data.synth import write_synthetic_tree
from organtrain.errors import ChecksumMismatchError, DataError
from organtrain.storage import LocalStorage, open_storage

ORGANS = {"lung": ["adenocarcinoma", "benign"], "colon": ["adenocarcinoma", "benign"]}
CFG = PrepareConfig(
    dataset="t",
    test_fraction=0.25,
    val_fraction=0.2,
    min_images_per_diagnosis=5,
    max_image_side=32,
    images_per_shard=8,
    workers=4,
)


def make_tree(root: Path, per_diagnosis: int = 20, seed: int = 0, organs=ORGANS) -> Path:
    write_synthetic_tree(
        root,
        organs=organs,
        images_per_diagnosis=per_diagnosis,
        image_size=32,
        seed=seed,
        progress=False,
    )
    return root


def run(src: Path, dest, cfg=CFG):
    return prepare(
        LocalStorage(src),
        dest if not isinstance(dest, Path) else LocalStorage(dest),
        cfg,
        progress=False,
    )


def tables(dest: LocalStorage, version: str, dataset: str = "t"):
    base = f"datasets/{dataset}/{version}"
    # With the near-duplicate signatures, which the pool keeps beside the shards.
    manifest = read_manifest(dest, load_dataset(dest, dataset, version)).to_pylist()
    rejected = read_parquet(dest.get_bytes(f"{base}/rejected.parquet")).to_pylist()
    return manifest, rejected


def png_bytes(mode="RGB", size=(24, 24), fmt="PNG") -> bytes:
    out = io.BytesIO()
    if mode == "P":  # a real palette (an all-black one is saved as 1-bit)
        image = Image.new("RGB", size, (200, 90, 160)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, size)
    image.save(out, format=fmt)
    return out.getvalue()


def test_prepare_writes_manifest_shards_and_index(tmp_path):
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest)
    assert result.created and result.images == 80 and result.rejected == 0
    assert result.organs == ORGANS

    manifest, rejected = tables(dest, result.version)
    assert rejected == []
    assert len(manifest) == 80
    assert set(manifest[0]) == {"key", "organ", "diagnosis", "label", "sha256", "width", "height",
                                "mode", "bytes", "split", "duplicate_of", "shard", "group",
                                "unit", "neardup_cluster", "signature", "metadata",
                                "encoded_width", "encoded_height", "source_tag"}  # fmt: skip
    for row in manifest:
        assert row["key"].startswith(f"{row['organ']}/{row['diagnosis']}/")
        assert row["label"] == ORGANS[row["organ"]].index(row["diagnosis"])
        assert (row["width"], row["height"], row["mode"]) == (32, 32, "RGB")
    splits = {row["split"] for row in manifest}
    assert splits == {"train", "val", "test"}

    index = load_dataset(dest, "t")
    assert index.version == result.version
    assert index.organs["lung"].diagnoses == ["adenocarcinoma", "benign"]
    total = sum(sum(c.values()) for o in index.organs.values() for c in o.counts.values())
    assert total == 80
    # Every shard is listed with a checksum that matches the published object, and the
    # records inside agree with the manifest (label, split via shard name, pixels RGB).
    by_sha = {(r["organ"], r["sha256"]): r for r in manifest}
    seen = 0
    for shard in index.shards:
        path = fetch_shard(dest, index, shard, tmp_path / "cache" / shard.key)
        records = list(read_shard(path))
        assert len(records) == shard.images <= CFG.images_per_shard
        for record in records:
            row = by_sha[(shard.organ, record.sha256)]
            assert (row["split"], row["label"], row["key"]) == (
                shard.split,
                record.label,
                record.source_key,
            )
            assert row["shard"] == shard.key
            pixels = np.asarray(Image.open(io.BytesIO(record.encoded)))
            assert pixels.shape == (record.height, record.width, 3)
            seen += 1
    assert seen == 80


def test_rerun_on_unchanged_input_writes_nothing(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    store = tmp_path / "store"
    args = ["prepare", str(src), "--dest", str(store), "--dataset", "t", "--no-progress",
            "--set", "prepare.min_images_per_diagnosis=5"]  # fmt: skip
    assert main(args) == 0
    # Files only: the dataset's lock is created and removed beside LATEST.json, which
    # touches its folder's mtime; no object is written or left behind.
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert main(args) == 0
    after = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert before == after
    assert "unchanged, nothing written" in capsys.readouterr().out


def test_old_images_keep_their_split_when_images_are_added(tmp_path):
    src = make_tree(tmp_path / "src", per_diagnosis=20)
    dest = LocalStorage(tmp_path / "store")
    first = run(src, dest)
    old, _ = tables(dest, first.version)

    # Tonight's delivery: more images in every class (another seed), and a new organ.
    organs = {**ORGANS, "blood": ["malaria_parasitized", "uninfected"]}
    extra = make_tree(tmp_path / "extra", per_diagnosis=15, seed=7, organs=organs)
    for path in extra.rglob("*.png"):
        target = src / path.relative_to(extra).with_name("new_" + path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    second = run(src, dest)
    assert second.version != first.version and second.images == 80 + 90
    new, _ = tables(dest, second.version)
    new_by_key = {r["key"]: r for r in new}
    for row in old:
        assert new_by_key[row["key"]]["split"] == row["split"]
        assert new_by_key[row["key"]]["sha256"] == row["sha256"]
    # The old version is untouched and still readable.
    assert load_dataset(dest, "t", first.version).images == 80
    assert load_dataset(dest, "t").version == second.version


def test_duplicates_share_a_split_and_a_record(tmp_path):
    src = make_tree(tmp_path / "src")
    original = sorted((src / "lung" / "benign").glob("*.png"))[0]
    shutil.copy(original, src / "lung" / "benign" / "zz_copy.png")
    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest)
    manifest, _ = tables(dest, result.version)
    rows = {r["key"]: r for r in manifest}
    copy, first = rows["lung/benign/zz_copy.png"], rows[f"lung/benign/{original.name}"]
    assert copy["split"] == first["split"] and copy["shard"] == first["shard"]
    assert copy["duplicate_of"] == first["key"] and first["duplicate_of"] is None
    index = load_dataset(dest, "t")
    assert sum(s.images for s in index.shards) == 80  # the copy is stored once


def test_identical_image_under_two_diagnoses_is_rejected(tmp_path):
    src = make_tree(tmp_path / "src")
    original = sorted((src / "lung" / "benign").glob("*.png"))[0]
    shutil.copy(original, src / "lung" / "adenocarcinoma" / "mislabelled.png")
    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest)
    manifest, rejected = tables(dest, result.version)
    conflicts = {r["key"]: r for r in rejected if r["reason"] == "conflicting_labels"}
    assert set(conflicts) == {"lung/adenocarcinoma/mislabelled.png", f"lung/benign/{original.name}"}
    assert "different diagnoses" in conflicts["lung/adenocarcinoma/mislabelled.png"]["detail"]
    assert not {r["key"] for r in manifest} & set(conflicts)


def test_every_kind_of_bad_file_is_rejected_and_the_rest_prepared(tmp_path):
    src = make_tree(tmp_path / "src")
    good = sorted((src / "lung" / "benign").glob("*.png"))[0].read_bytes()
    bad = {
        "lung/benign/empty.png": (b"", "empty_file"),
        "lung/benign/cut.png": (good[: len(good) // 2], "truncated"),
        "lung/benign/notes.png": (b"this is not an image", "not_an_image"),
        "lung/benign/depth16.tif": (png_bytes("I;16", fmt="TIFF"), "unsupported_mode"),
        "lung/benign/print.JPG": (png_bytes("CMYK", fmt="JPEG"), "unsupported_mode"),
        "lung/benign/readme.txt": (b"hello", "unsupported_extension"),
        "lung/stray.png": (good, "bad_layout"),
        "lung/benign/patient/extra/deeper.png": (good, "bad_layout"),
    }
    for key, (data, _) in bad.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    (src / "lung" / "benign" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    # Other formats and modes that are fine: greyscale TIFF, palette BMP, RGBA PNG, JPEG.
    fine = {
        "colon/benign/grey.TIFF": png_bytes("L", fmt="TIFF"),
        "colon/benign/palette.bmp": png_bytes("P", fmt="BMP"),
        "colon/benign/alpha.png": png_bytes("RGBA"),
        "colon/benign/photo.jpeg": png_bytes("RGB", (40, 30), fmt="JPEG"),
    }
    for key, data in fine.items():
        (src / key).write_bytes(data)

    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest)
    manifest, rejected = tables(dest, result.version)
    reasons = {r["key"]: r["reason"] for r in rejected}
    assert reasons == {key: reason for key, (_, reason) in bad.items()}
    assert all(r["detail"] for r in rejected)
    assert result.images == 80 + len(fine)
    assert {r["key"]: r["mode"] for r in manifest if r["key"] in fine} == {
        "colon/benign/grey.TIFF": "L", "colon/benign/palette.bmp": "P",
        "colon/benign/alpha.png": "RGBA", "colon/benign/photo.jpeg": "RGB",
    }  # fmt: skip


def test_small_diagnosis_and_single_class_organ_are_left_out(tmp_path, caplog):
    src = make_tree(
        tmp_path / "src", organs={**ORGANS, "blood": ["malaria_parasitized", "uninfected"]}
    )
    for path in sorted((src / "lung" / "benign").glob("*.png"))[3:]:
        path.unlink()  # lung/benign: 3 images, below the minimum of 5
    shutil.rmtree(src / "blood" / "uninfected")  # blood: one diagnosis left
    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest)
    assert set(result.organs) == {"colon"}
    reasons = " | ".join(item["reason"] for item in result.excluded)
    assert "lung/benign has 3 distinct image(s); at least 5" in reasons
    assert "organ lung has 1 usable diagnosis folder(s) (adenocarcinoma)" in reasons
    assert "organ blood has 1 usable diagnosis folder(s) (malaria_parasitized)" in reasons
    assert "left out" in caplog.text
    _, rejected = tables(dest, result.version)
    by_reason = {}
    for r in rejected:
        by_reason.setdefault(r["reason"], set()).add(
            r["key"].split("/")[0] + "/" + r["key"].split("/")[1]
        )
    assert by_reason == {
        "diagnosis_too_small": {"lung/benign"},
        "organ_single_diagnosis": {"lung/adenocarcinoma", "blood/malaria_parasitized"},
    }


def test_nothing_usable_is_a_clear_error(tmp_path):
    (tmp_path / "src" / "lung" / "benign").mkdir(parents=True)
    (tmp_path / "src" / "lung" / "benign" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found under .*src"):
        run(tmp_path / "src", tmp_path / "store")
    src = make_tree(tmp_path / "one", organs={"lung": ["benign"]})
    with pytest.raises(DataError, match=r"no organ .* has two diagnoses"):
        run(src, tmp_path / "store")


def test_flipped_byte_in_a_shard_is_caught_and_named(tmp_path):
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    run(src, dest)
    index = load_dataset(dest, "t")
    shard = index.shards_for("lung", "train")[0]
    path = tmp_path / "store" / shard_object_key(index, shard)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=rf"{shard.key}"):
        fetch_shard(dest, index, shard, tmp_path / "cache" / "x.tfrecord")
    assert not (tmp_path / "cache" / "x.tfrecord").exists()


def test_interrupted_publish_is_completed_without_rewriting_shards(tmp_path):
    src = make_tree(tmp_path / "src")
    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest)
    version_dir = tmp_path / "store" / "datasets" / "t" / result.version
    pool = tmp_path / "store" / "datasets" / "t" / "shards"
    # As if the run died after its shards were uploaded but before the index:
    (version_dir / "dataset.json").unlink()
    lost = sorted(pool.glob("*/*.tfrecord"))[0]
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in pool.glob("*/*.tfrecord")}
    with pytest.raises(DataError, match="never completed"):
        load_dataset(dest, "t", result.version)
    again = run(src, dest)
    assert again.created and again.version == result.version
    assert lost.exists()
    assert kept == {p: p.stat().st_mtime_ns for p in kept}
    assert load_dataset(dest, "t").images == 80


def test_large_images_are_downscaled_keeping_aspect(tmp_path):
    src = make_tree(tmp_path / "src")
    (src / "lung" / "benign" / "wide.png").write_bytes(png_bytes("RGB", (100, 50)))
    dest = LocalStorage(tmp_path / "store")
    result = run(src, dest, replace(CFG, max_image_side=32))
    index = load_dataset(dest, "t")
    manifest, _ = tables(dest, result.version)
    row = next(r for r in manifest if r["key"] == "lung/benign/wide.png")
    assert (row["width"], row["height"]) == (100, 50)  # the manifest keeps the original size
    shard = next(s for s in index.shards if s.key == row["shard"])
    record = next(r for r in read_shard(fetch_shard(dest, index, shard, tmp_path / "s.tfrecord"))
                  if r.source_key == row["key"])  # fmt: skip
    assert (record.width, record.height) == (32, 16)


def test_prepare_from_and_to_s3(tmp_path, s3_uri):
    src = make_tree(tmp_path / "src")
    source = open_storage(f"{s3_uri}/incoming")
    for path in sorted(src.rglob("*.png")):
        source.put_file(path.relative_to(src).as_posix(), path)
    dest = open_storage(f"{s3_uri}/store")
    result = prepare(source, dest, CFG, progress=False)
    assert result.created and result.images == 80
    assert result.uri == f"{s3_uri}/store/datasets/t/{result.version}"
    index = load_dataset(dest, "t")
    shard = index.shards_for("colon", "test")[0]
    records = list(read_shard(fetch_shard(dest, index, shard, tmp_path / "c.tfrecord")))
    assert len(records) == shard.images
    assert prepare(source, dest, CFG, progress=False).created is False

    # Corrupt one shard in the bucket: reading it fails and names it.
    key = shard_object_key(index, shard)
    data = bytearray(dest.get_bytes(key))
    data[-5] ^= 0xFF
    client, full_key = dest.client, f"{dest.prefix}/{key}"
    client.put_object(Bucket=dest.bucket, Key=full_key, Body=bytes(data))  # no checksum metadata
    with pytest.raises(ChecksumMismatchError, match=shard.key):
        fetch_shard(dest, index, shard, tmp_path / "c2.tfrecord")
    assert json.loads(dest.get_bytes("datasets/t/LATEST.json"))["version"] == result.version


def test_the_same_input_gives_the_same_shard_bytes_in_another_process(tmp_path):
    import subprocess
    import sys

    src = make_tree(tmp_path / "src")
    checksums = []
    for n in range(2):  # separate processes: protobuf's map order may differ between them
        store = tmp_path / f"store{n}"
        subprocess.run(
            [sys.executable, "-m", "organtrain", "prepare", str(src), "--dest", str(store),
             "--dataset", "t", "--no-progress", "--set", "prepare.min_images_per_diagnosis=5"],
            check=True, capture_output=True,
        )  # fmt: skip
        index = load_dataset(LocalStorage(store), "t")
        checksums.append({s.key: s.sha256 for s in index.shards})
    assert checksums[0] == checksums[1] and len(checksums[0]) > 4
