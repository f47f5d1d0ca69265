"""Launch a real S3-compatible server (SeaweedFS) on loopback: what the S3 store's tests,
the multi-replica test and local development run against.

SeaweedFS is one Go binary. `go install` refuses its module (it has replace directives),
so `ensure_weed` downloads the pinned module into the Go module cache (`go mod download`,
through the Go module proxy), builds `./weed` in a writable copy of it (about 3-5 minutes
on 2 cores, a ~230 MB binary) and keeps the binary in the loraloop cache directory, as the
Kafka jars are kept. `SeaweedS3` runs `weed server -s3` (master, volume, filer and S3
gateway in one process) on free loopback ports with a throwaway data directory, and
creates buckets. It accepts any credentials (no identities configured).

    python -m loraloop.devtools.s3_server build     # build and cache the binary
    python -m loraloop.devtools.s3_server run       # serve until Ctrl-C; prints the endpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from filelock import FileLock

from loraloop.core.settings import cache_dir
from loraloop.devtools.kafka_broker import free_port

__all__ = ["SEAWEEDFS_MODULE", "SEAWEEDFS_VERSION", "SeaweedS3", "ensure_weed"]

SEAWEEDFS_MODULE = "github.com/seaweedfs/seaweedfs"
SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"  # weed 4.53
HOST = "127.0.0.1"
_BUILD_TIMEOUT_S = 1800.0
_START_TIMEOUT_S = 90.0
#: Credentials any client may use: the server checks none, but boto3 signs every request.
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "loraloop", "AWS_SECRET_ACCESS_KEY": "loraloop-local"}


def _go() -> str:
    found = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file() else None
    )
    if found is None:
        raise RuntimeError(
            "Building SeaweedFS needs Go 1.24+ on PATH (e.g. `apt-get install golang`, or "
            "https://go.dev/dl); set LORALOOP_WEED to use a weed binary you have."
        )
    return found


def weed_path() -> Path:
    """Where the cached binary lives (LORALOOP_WEED overrides; it is not built then)."""
    override = os.environ.get("LORALOOP_WEED")
    if override:
        return Path(override)
    return cache_dir() / f"seaweedfs-{SEAWEEDFS_VERSION.rsplit('-', 1)[-1]}" / "weed"


def ensure_weed(progress: bool = True) -> Path:
    """The `weed` binary: cached, else built from the pinned module (see the module)."""
    target = weed_path()
    if target.is_file():
        return target
    if os.environ.get("LORALOOP_WEED"):
        raise RuntimeError(f"LORALOOP_WEED={target}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / ".build.lock")):
        if target.is_file():
            return target
        go = _go()
        if progress:
            print(
                f"building SeaweedFS {SEAWEEDFS_VERSION} (weed, one-off, ~3-5 min)", file=sys.stderr
            )
        info = subprocess.run(
            [go, "mod", "download", "-json", f"{SEAWEEDFS_MODULE}@{SEAWEEDFS_VERSION}"],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT_S,
            check=False,
            cwd=tempfile.gettempdir(),
        )
        if info.returncode != 0:
            raise RuntimeError(f"go mod download of SeaweedFS failed: {info.stderr or info.stdout}")
        module_dir = Path(json.loads(info.stdout)["Dir"])
        with tempfile.TemporaryDirectory(prefix="weed-build-", dir=target.parent) as tmp:
            src = Path(tmp) / "src"
            shutil.copytree(module_dir, src)  # the module cache is read-only
            for path in [src, *src.rglob("*")]:
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | 0o200)
            out = Path(tmp) / "weed"
            build = subprocess.run(
                [go, "build", "-o", str(out), "./weed"],
                cwd=src,
                capture_output=True,
                text=True,
                timeout=_BUILD_TIMEOUT_S,
                check=False,
            )
            if build.returncode != 0:
                raise RuntimeError(f"go build ./weed failed:\n{build.stderr[-4000:]}")
            os.replace(out, target)
    return target


class SeaweedS3:
    """A `weed server -s3` child process on loopback (see the module). Use as a context
    manager, or `start()` / `stop()`."""

    def __init__(self, data_dir: Path | None = None, buckets: tuple[str, ...] = ()) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="loraloop-s3-"))
        self.buckets = buckets
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this server with the usual AWS variables."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            **DUMMY_CREDENTIALS,
        }

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def start(self) -> SeaweedS3:
        weed = ensure_weed()
        ports: list[int] = []
        for _ in range(8):
            ports.append(free_port(exclude=ports))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
        self.port = s3
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self._log = (self.data_dir / "weed.log").open("ab")
        args = [
            str(weed),
            "server",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        self._proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the S3 gateway answers and every bucket exists (the gateway comes up
        before the filer is ready to take writes)."""
        client = self.client()
        deadline = time.monotonic() + _START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in self.buckets:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                probe = "loraloop-ready-probe"
                for bucket in self.buckets:
                    client.put_object(Bucket=bucket, Key=probe, Body=b"")
                    client.delete_object(Bucket=bucket, Key=probe)
                return
            except Exception as exc:  # not up yet: connection refused, 500s from the filer
                last = exc
                time.sleep(0.3)
        raise RuntimeError(
            f"SeaweedFS S3 not ready in {_START_TIMEOUT_S:.0f}s ({last}): {self.log_tail()}"
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.data_dir / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SeaweedFS S3 on loopback, for development.")
    parser.add_argument("command", choices=["build", "run"])
    parser.add_argument("--bucket", default="adapters", help="bucket to create (run)")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(ensure_weed())
        return 0
    with SeaweedS3(buckets=(args.bucket,)) as server:
        print(f"S3 ready at {server.endpoint} (bucket {args.bucket!r}); Ctrl-C stops it")
        for key, value in server.env().items():
            print(f"export {key}={value}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
