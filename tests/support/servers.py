"""Real servers on 127.0.0.1 for the tests: moto's S3-compatible server and `mlflow server`.

Both are started as subprocesses on free ports and stopped at the end of the session; the
tests reach them over HTTP exactly as the pipeline reaches MinIO/S3 and a tracking server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{url}: server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout_s}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def _serve(
    cmd: list[str], env: dict, ready_url: str, timeout_s: float, log: Path
) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(ready_url, timeout_s, proc, log)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@dataclass
class Services:
    s3_endpoint: str
    tracking_uri: str = ""

    def env(self) -> dict[str, str]:
        """What a pipeline process needs to reach both servers."""
        env = {
            **AWS_ENV,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
        }
        if self.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        return env


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's standalone S3-compatible server; yields its endpoint URL."""
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    with _serve(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        AWS_ENV,
        f"http://127.0.0.1:{port}/moto-api/",
        60,
        workdir / "moto.log",
    ):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def mlflow_server(workdir: Path, s3_endpoint: str, bucket: str) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and an S3 artifact root; yields its URI."""
    port = free_port()
    exe = str(Path(sys.executable).parent / "mlflow")
    cmd = [
        exe,
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root",
        f"s3://{bucket}/mlflow",
        "--no-serve-artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {
        **AWS_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        # Without this the server starts a job runner and takes 2.3 GB instead of 0.5 GB.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with _serve(cmd, env, f"http://127.0.0.1:{port}/health", 180, workdir / "mlflow.log"):
        yield f"http://127.0.0.1:{port}"
