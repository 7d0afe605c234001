"""The split decision as a pure function: groups, copies and near-duplicates share a split,
existing images never move, bridges are left out, the unit keys are uniform."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from organtrain.data.assign import CheckedImage, assign
from organtrain.data.grouping import Node, split_units
from organtrain.data.split import split_of, unit_position

FRACTIONS = {"test_fraction": 0.2, "val_fraction": 0.2}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def image(key: str, *, group=None, signature=b"", content=None) -> CheckedImage:
    organ, diagnosis = key.split("/")[:2]
    return CheckedImage(
        key, organ, diagnosis, sha(content or key), 8, 8, "RGB", 100, 8, 8, group,
        signature or sha(key).encode(),
    )  # fmt: skip


def same_signature(signatures):
    """Near-duplicates, for these tests: images whose signatures are equal."""
    return [(i, j) for i, j in itertools.combinations(range(len(signatures)), 2)
            if signatures[i] == signatures[j]]  # fmt: skip


def run(images, previous=None, minimum=2):
    return assign(
        images, **FRACTIONS, min_images_per_diagnosis=minimum,
        find_pairs=same_signature, previous=previous,
    )  # fmt: skip


def population(n=60, prefix="x"):
    return [image(f"lung/{d}/{prefix}{i}.png") for d in ("benign", "tumour") for i in range(n)]


def splits(assignment) -> dict[str, str]:
    return {r.image.key: r.split for r in assignment.rows}


def test_a_group_keeps_every_image_in_one_split_across_diagnoses():
    patients = [f"p{i}" for i in range(20)]
    images = population() + [
        image(f"lung/{d}/{p}/{n}.png", group=p)
        for p in patients for d in ("benign", "tumour") for n in range(3)
    ]  # fmt: skip
    result = run(images)
    by_group = {}
    for row in result.rows:
        if row.image.group:
            by_group.setdefault(row.image.group, set()).add(row.split)
            assert row.unit == f"group:lung/{row.image.group}"
    assert all(len(s) == 1 for s in by_group.values())
    assert {next(iter(s)) for s in by_group.values()} == {"train", "val", "test"}
    # The group's split is its key's, whatever its images' hashes say.
    for group, (split,) in by_group.items():
        assert split == split_of(f"group:lung/{group}", **FRACTIONS)


def test_near_duplicate_families_share_a_split_and_a_cluster():
    images = population()
    families = {f"f{i}": [image(f"lung/benign/f{i}_{k}.png", signature=f"F{i}".encode())
                          for k in range(4)] for i in range(30)}  # fmt: skip
    result = run(images + [m for f in families.values() for m in f])
    rows = {r.image.key: r for r in result.rows}
    for members in families.values():
        assert len({rows[m.key].split for m in members}) == 1
        clusters = {rows[m.key].cluster for m in members}
        assert len(clusters) == 1 and None not in clusters
    assert result.near_duplicate_pairs["lung"] == 30 * 6
    # Lone images keep the content-hash rule they always had, and have no cluster.
    lone = rows["lung/benign/x0.png"]
    assert lone.split == split_of(lone.image.sha256, **FRACTIONS) and lone.cluster is None


def test_cluster_keys_are_uniform_so_big_families_are_not_drawn_to_test():
    # The smallest of 8 hashes sits below 0.2 with probability 1 - 0.8**8 = 0.83; the
    # cluster key is hashed again, so a family lands in test about 20 % of the time.
    nodes = [Node(f"k{f}_{i}", sha(f"{f}/{i}"), None) for f in range(400) for i in range(8)]
    pairs = [(f * 8 + i, f * 8 + i + 1) for f in range(400) for i in range(7)]
    units = split_units("lung", nodes, pairs)
    positions = [unit_position(k) for k in units.unit_key]
    assert len(positions) == 400
    assert 0.13 < sum(p < 0.2 for p in positions) / 400 < 0.27


def test_added_images_never_move_existing_ones_and_a_bridge_is_left_out():
    first = run(population())
    previous = {(r.image.organ, r.image.sha256): r.split for r in first.rows}
    old = splits(first)
    train_key, other_train_key = [k for k, s in old.items() if s == "train"][:2]
    test_key = next(k for k, s in old.items() if s == "test")
    rows = {r.image.key: r for r in first.rows}

    def copy_of(key, new_key):  # a near-duplicate of an existing image
        return image(new_key, signature=rows[key].image.signature)

    # A new patient's tiles: one is a near-duplicate of a test image, another of a train
    # image, so the patient would join two splits.
    tonight = population() + population(30, prefix="new") + [
        copy_of(train_key, "lung/benign/near_train.png"),
        image("lung/benign/bridge.png", group="pb"),
        image("lung/tumour/bridge_sibling.png", group="pb",
              signature=rows[test_key].image.signature),
        image("lung/tumour/bridge_too.png", group="pb",
              signature=rows[other_train_key].image.signature),
    ]  # fmt: skip
    second = run(tonight, previous=previous)
    new = splits(second)
    assert all(new[k] == s for k, s in old.items())  # nothing that existed moved
    assert new["lung/benign/near_train.png"] == "train"
    bridged = {r.key: r for r in second.rejected if r.reason == "bridges_splits"}
    assert set(bridged) == {
        "lung/benign/bridge.png", "lung/tumour/bridge_sibling.png", "lung/tumour/bridge_too.png"
    }  # fmt: skip
    detail = bridged["lung/benign/bridge.png"].detail
    assert f"{other_train_key} (train)" in detail and f"{test_key} (test)" in detail


def test_regrouped_existing_images_are_reunited_in_one_split():
    first = run(population())
    previous = {(r.image.organ, r.image.sha256): r.split for r in first.rows}
    old = splits(first)
    # A groups table now says a train image and a test image come from one patient.
    a = next(k for k, s in old.items() if s == "train")
    b = next(k for k, s in old.items() if s == "test")
    images = [image(i.key, group="p1") if i.key in (a, b) else i for i in population()]
    second = run(images, previous=previous)
    new = splits(second)
    assert new[a] == new[b] == split_of("group:lung/p1", **FRACTIONS)
    assert not second.rejected
    assert all(new[k] == s for k, s in old.items() if k not in (a, b))


def test_a_diagnosis_without_test_images_after_grouping_is_left_out():
    # Every tumour image belongs to one patient: one split only, so no usable test set.
    images = [image(f"lung/benign/b{i}.png") for i in range(60)] + [
        image(f"lung/tumour/p/{i}.png", group="p") for i in range(20)
    ]
    result = run(images)
    assert not result.organs
    reasons = " ".join(e["reason"] for e in result.excluded)
    assert "lung/tumour has 20 distinct images but none fall in the" in reasons
    assert "share a split" in reasons


@pytest.mark.parametrize("n", [1, 5])
def test_units_of_a_lone_image_and_exact_copies_keep_the_hash_rule(n):
    nodes = [Node(f"k{i}", sha("same"), None) for i in range(n)]
    units = split_units("lung", nodes, [])
    assert units.unit_key == [sha("same")] and units.cluster == [None] * n
