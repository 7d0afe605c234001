"""Both storage backends against the same contract; S3 runs on a real SeaweedFS."""

import hashlib
import multiprocessing
import os
import signal
import time

import pytest
from seaweedfs import SECRET_KEY, free_ports

from organtrain.errors import ChecksumMismatchError, ObjectNotFoundError, StorageError
from organtrain.storage import LocalStorage, S3Storage, open_storage, validate_key


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return open_storage(request.getfixturevalue("s3_uri") + "/some/prefix")


def test_put_get_roundtrip_records_sha256(storage):
    info = storage.put_bytes("a/b/c.bin", b"hello")
    assert info.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert info.size == 5
    assert storage.get_bytes("a/b/c.bin") == b"hello"
    assert storage.get_bytes("a/b/c.bin", sha256=info.sha256) == b"hello"
    assert storage.checksum("a/b/c.bin") == info.sha256
    assert storage.stat("a/b/c.bin").size == 5


def _claim(args):
    uri, key, who = args
    return who if open_storage(uri).put_if_absent(key, who.encode()) else None


def test_put_if_absent_lets_exactly_one_writer_win(storage):
    assert storage.put_if_absent("locks/x", b"first")
    assert not storage.put_if_absent("locks/x", b"second")
    assert storage.get_bytes("locks/x") == b"first"
    assert [i.key for i in storage.list("locks")] == ["locks/x"]  # no temporary left
    # Eight processes race for one key: one wins, and the object is the winner's.
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        won = pool.map(_claim, [(storage.uri, "locks/race", f"w{i}") for i in range(8)])
    winners = [w for w in won if w]
    assert len(winners) == 1
    assert storage.get_bytes("locks/race") == winners[0].encode()


def test_overwrite_replaces_whole_object(storage):
    storage.put_bytes("k", b"old contents")
    storage.put_bytes("k", b"new")
    assert storage.get_bytes("k") == b"new"


def test_list_is_recursive_sorted_and_relative(storage):
    for key in ["z.txt", "a/2.txt", "a/1.txt", "b/c/d.txt"]:
        storage.put_bytes(key, key.encode())
    assert [i.key for i in storage.list()] == ["a/1.txt", "a/2.txt", "b/c/d.txt", "z.txt"]
    assert [i.key for i in storage.list("a")] == ["a/1.txt", "a/2.txt"]
    assert [i.key for i in storage.list("b/c")] == ["b/c/d.txt"]


def test_sub_view_shares_the_backend(storage):
    storage.sub("x/y").put_bytes("f", b"1")
    assert storage.get_bytes("x/y/f") == b"1"
    assert [i.key for i in storage.sub("x").list()] == ["y/f"]


def test_missing_key_is_named(storage):
    assert storage.stat("nope") is None
    assert not storage.exists("nope")
    with pytest.raises(ObjectNotFoundError, match="nope"):
        storage.get_bytes("dir/nope")
    storage.delete("never-existed")  # no error


def test_checksum_mismatch_names_the_key(storage):
    storage.put_bytes("shard.tfrecord", b"payload")
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ChecksumMismatchError, match=r"shard\.tfrecord.*re-run"):
        storage.get_bytes("shard.tfrecord", sha256=wrong)


def test_download_verifies_and_leaves_nothing_on_mismatch(storage, tmp_path):
    info = storage.put_bytes("d/file", b"x" * 1000)
    target = tmp_path / "dl" / "file"
    storage.download("d/file", target, sha256=info.sha256)
    assert target.read_bytes() == b"x" * 1000
    bad_target = tmp_path / "dl" / "bad"
    with pytest.raises(ChecksumMismatchError, match="d/file"):
        storage.download("d/file", bad_target, sha256="0" * 64)
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["file"]


def test_put_file_large_object(storage, tmp_path):
    # 9 MB: above boto3's 8 MB multipart threshold, so S3 takes the multipart path.
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(9 << 20))
    info = storage.put_file("big/big.bin", path)
    assert storage.checksum("big/big.bin") == info.sha256
    target = tmp_path / "back.bin"
    storage.download("big/big.bin", target, sha256=info.sha256)
    assert target.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "a/../b", "..", "a//b", "a/./b", "a/b\n", "x\x00y", "a\\b", " a"]
)
def test_unsafe_keys_are_refused(storage, key):
    with pytest.raises(StorageError, match="invalid storage key"):
        storage.put_bytes(key, b"x")


def test_validate_key_accepts_ordinary_names():
    assert (
        validate_key("lung/adenocarcinoma/img 001 (copy).PNG")
        == "lung/adenocarcinoma/img 001 (copy).PNG"
    )
    assert validate_key("blood/über/ß.png")


def _write_forever(root: str, payload_size: int) -> None:
    store = LocalStorage(root)
    payload = b"n" * payload_size
    while True:
        store.put_bytes("obj", payload)


def test_local_write_killed_midway_leaves_old_or_new_object(tmp_path):
    store = LocalStorage(tmp_path)
    store.put_bytes("obj", b"old")
    size = 32 << 20
    for delay in (0.05, 0.2, 0.4):
        child = multiprocessing.get_context("fork").Process(
            target=_write_forever, args=(str(tmp_path), size)
        )
        child.start()
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)  # a crash: no cleanup code runs
        child.join()
        assert store.get_bytes("obj") in (b"old", b"n" * size)
        assert [i.key for i in store.list()] == ["obj"]  # partial files never listed


def test_s3_object_changed_behind_our_back_is_caught(s3_uri, s3_env):
    storage = open_storage(s3_uri)
    storage.put_bytes("k", b"good")
    bucket, key = storage.bucket, f"{storage.prefix}/k"
    stored = s3_env.client().head_object(Bucket=bucket, Key=key)["Metadata"]
    # Someone rewrites the bytes but the old checksum metadata stays.
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=b"evil", Metadata=stored)
    with pytest.raises(ChecksumMismatchError, match=f"{s3_uri}/k"):
        storage.get_bytes("k")


def test_s3_missing_bucket_is_named(s3_env):
    # Reads, as `prepare` does first. (SeaweedFS creates a missing bucket on a write,
    # unlike AWS, so a write is not a reliable probe here.)
    storage = open_storage("s3://no-such-bucket-here/prefix")
    with pytest.raises(
        StorageError, match=r"bucket 'no-such-bucket-here' does not exist.*create it"
    ):
        storage.get_bytes("k")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        list(storage.list())


def test_s3_wrong_credentials_are_named_but_never_printed(s3_uri, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + SECRET_KEY)
    storage = open_storage(s3_uri)
    with pytest.raises(StorageError) as err:
        storage.get_bytes("anything")
    message = str(err.value)
    assert "rejected the credentials" in message
    assert f"{s3_uri}/anything" in message
    assert SECRET_KEY not in message


def test_s3_unknown_access_key(s3_uri, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match=r"rejected the credentials \(InvalidAccessKeyId\)"):
        list(open_storage(s3_uri).list())


def test_s3_unreachable_endpoint_is_named(s3_env):
    (port,) = free_ports(1)  # nothing listens here
    storage = open_storage("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{port}")
    assert isinstance(storage, S3Storage)
    with pytest.raises(
        StorageError, match=rf"cannot reach the S3 endpoint http://127.0.0.1:{port}"
    ):
        storage.get_bytes("k")


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_storage("gs://bucket/x")
