"""s3://bucket/prefix through boto3, against AWS or any S3-compatible endpoint.

A PutObject, and a multipart upload's CompleteMultipartUpload, make an object visible
whole or not at all: S3 itself is the atomic publish step, so no temporary key and
copy are needed (that would double the traffic). The sha256 of every object is stored
in its metadata (`x-amz-meta-sha256`) and checked on every read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config

from organtrain.errors import ObjectNotFoundError, StorageError
from organtrain.storage.base import (
    ObjectInfo,
    Storage,
    sha256_bytes,
    sha256_file,
    verify_checksum,
)
from organtrain.storage.keys import join_key, validate_key

SHA256_META = "sha256"
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
# What a HEAD request answers when refused: a bare status, no error code (HEAD has no body).
_BARE_FORBIDDEN = {"403", "Forbidden"}
_CREDENTIAL_CHAIN = (
    "credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
    "else the AWS_PROFILE profile in ~/.aws, else the instance or pod role"
)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write s3://bucket/prefix")
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix)
    return bucket, prefix


def make_client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client; credentials come from the standard AWS chain only."""
    config = Config(
        # Fail in seconds, not minutes, when the endpoint is down; retry transient errors.
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


class S3Storage(Storage):
    """`setting` is the configuration field this storage came from (storage.uri,
    prepare.source): the field a user fixes when the bucket does not exist."""

    def __init__(
        self, bucket: str, prefix: str = "", *, client=None, endpoint_url=None, region=None,
        setting: str = "storage.uri",
    ):  # fmt: skip
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.setting = setting
        self.client = client or make_client(endpoint_url, region)

    @property
    def uri(self) -> str:
        return f"s3://{join_key(self.bucket, self.prefix)}"

    def sub(self, prefix: str) -> S3Storage:
        return S3Storage(self.bucket, self._key(prefix), client=self.client, setting=self.setting)

    def _key(self, key: str) -> str:
        return join_key(self.prefix, validate_key(key))

    def _fail(self, err: Exception, key: str | None) -> StorageError:
        """Turn a boto3 error into a message that names the key and what to do."""
        where = self.url(key) if key else self.uri
        endpoint = self.client.meta.endpoint_url
        if isinstance(err, botocore.exceptions.NoCredentialsError):
            return StorageError(f"{where}: no AWS credentials found; {_CREDENTIAL_CHAIN}")
        if isinstance(
            err,
            botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError,
        ):
            return StorageError(
                f"{where}: cannot reach the S3 endpoint {endpoint}; check storage.endpoint_url "
                "or AWS_ENDPOINT_URL and that the server is running"
            )
        if isinstance(err, botocore.exceptions.ClientError):
            code = err.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return StorageError(
                    f"{where}: bucket {self.bucket!r} does not exist at {endpoint}; "
                    f"create it or fix {self.setting}"
                )
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFoundError(f"{where} does not exist")
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"{where}: the endpoint {endpoint} rejected the credentials ({code}): "
                    f"a wrong or expired key; {_CREDENTIAL_CHAIN}"
                )
            if code in ("AccessDenied", *_BARE_FORBIDDEN):
                return StorageError(
                    f"{where}: access denied ({code}); these credentials may not use this "
                    "bucket or prefix"
                )
            return StorageError(f"{where}: S3 error {code or 'unknown'}")
        return StorageError(f"{where}: {type(err).__name__}")

    def _call(self, key: str | None, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            raise self._fail(err, key) from None

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        digest = sha256_bytes(data)
        self._call(
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            Metadata={SHA256_META: digest},
        )
        return ObjectInfo(key=key, size=len(data), sha256=digest)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """A conditional PutObject (If-None-Match: *): S3 refuses it with 412 when the key
        exists, so of two writers exactly one succeeds."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                Metadata={SHA256_META: sha256_bytes(data)},
            )  # fmt: skip
        except botocore.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise self._fail(err, key) from None
        except botocore.exceptions.BotoCoreError as err:
            raise self._fail(err, key) from None
        return True

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        digest = sha256_file(path)
        self._call(
            key,
            self.client.upload_file,  # multipart above 8 MB: invisible until completed
            str(path),
            self.bucket,
            self._key(key),
            ExtraArgs={"Metadata": {SHA256_META: digest}},
        )
        return ObjectInfo(key=key, size=os.path.getsize(path), sha256=digest)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        response = self._call(key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        data = self._call(key, response["Body"].read)
        stored = response.get("Metadata", {}).get(SHA256_META)
        actual = sha256_bytes(data)
        verify_checksum(self.url(key), sha256 or stored, actual)
        return data

    def download(self, key: str, path: str | Path, *, sha256: str | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256
        if expected is None:  # fall back to the digest stored at write time
            info = self.stat(key)
            if info is None:
                raise ObjectNotFoundError(f"{self.url(key)} does not exist")
            expected = info.sha256
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        os.close(fd)
        try:
            self._call(key, self.client.download_file, self.bucket, self._key(key), tmp)
            verify_checksum(self.url(key), expected, sha256_file(tmp))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def tune_location(self, key: str):
        """Tune writes through pyarrow's S3 filesystem, pointed at the same endpoint.

        It is given no keys: Tune pickles this filesystem into the experiment's state in
        storage (tuner.pkl, experiment_state) and into the tasks it sends, and a
        filesystem built with explicit keys pickles them. Without keys, pyarrow resolves
        them from the standard chain (environment, profile, instance/pod role) in each
        process that uses it, and only the endpoint and region, nothing secret, are
        pickled."""
        from urllib.parse import urlparse

        import pyarrow.fs

        endpoint = urlparse(self.client.meta.endpoint_url)
        options = {"region": self.client.meta.region_name or "us-east-1"}
        if not endpoint.hostname.endswith("amazonaws.com"):
            options |= {"endpoint_override": endpoint.netloc, "scheme": endpoint.scheme}
        return join_key(self.bucket, self._key(key)), pyarrow.fs.S3FileSystem(**options)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            failure = self._fail(self._why_forbidden(err, key), key)
            if isinstance(failure, ObjectNotFoundError):
                return None
            raise failure from None
        return ObjectInfo(
            key=key,
            size=head["ContentLength"],
            sha256=head.get("Metadata", {}).get(SHA256_META),
            version_tag=head.get("ETag"),
        )

    def _why_forbidden(self, err: Exception, key: str) -> Exception:
        """A refused HEAD says only 403: a wrong secret and a missing permission look the
        same. A one-byte GET of the same key is refused with the reason in its body
        (SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied); return that error."""
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        if code not in _BARE_FORBIDDEN:
            return err
        try:
            self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range="bytes=0-0")
        except botocore.exceptions.ClientError as probe:
            if probe.response.get("Error", {}).get("Code", "") not in ("", *_BARE_FORBIDDEN):
                return probe
        except botocore.exceptions.BotoCoreError:
            pass
        return err

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        key=obj["Key"][strip:], size=obj["Size"], version_tag=obj.get("ETag")
                    )
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            raise self._fail(err, prefix or None) from None

    def delete(self, key: str) -> None:
        self._call(key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))
