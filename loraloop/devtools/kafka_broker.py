"""Launch a real Apache Kafka broker (KRaft, combined broker+controller), or a cluster of them.

The broker runs from the `org.apache.kafka` jars on Maven Central: `ensure_kafka_jars` resolves
`kafka-pom.xml` (next to this module) once into the cache directory, and `KafkaBroker` formats
a data directory and runs `kafka.Kafka` in a child JVM listening on 127.0.0.1 only.
`KafkaCluster` runs several such nodes (3 by default) as one cluster, every node a broker and
a voter of a static controller quorum, with replicated internal topics: what the replication
tests kill brokers of. For the demo, the tests and local development; production brings its
own Kafka cluster, and the server and the learner need only `loraloop.core.kafka.admin`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO
from xml.sax.saxutils import escape, quoteattr

from loraloop.core.kafka.admin import live_broker_ids, ready_cluster_id
from loraloop.core.settings import cache_dir

__all__ = ["KAFKA_VERSION", "KafkaBroker", "KafkaCluster", "ensure_kafka_jars"]

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.3.1"
HOST = "127.0.0.1"
_POM = Path(__file__).with_name("kafka-pom.xml")
_MARKER = ".complete"
_MVN_TIMEOUT_S = 1800.0
_NODE_ID = 1


# --------------------------------------------------------------------------------------------
# jars
# --------------------------------------------------------------------------------------------


def _java() -> str:
    """Path of the `java` executable (JAVA_HOME first, then PATH)."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise RuntimeError(
            "The Kafka broker needs Java 17+, but `java` is not on PATH and JAVA_HOME is unset "
            "(install a JDK/JRE, e.g. `apt-get install openjdk-17-jre-headless`)."
        )
    return found


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing)."""
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_kafka_jars() -> Path:
    """Return the directory of the broker's jars, resolving them with Maven on first use.

    The jars land in `cache_dir()/kafka-<version>/libs`; a marker file holding the pom's hash
    makes later calls free, and a file lock keeps concurrent processes from racing.
    """
    home = cache_dir() / f"kafka-{KAFKA_VERSION}"
    libs = home / "libs"
    marker = home / _MARKER
    pom = _POM.read_bytes()
    digest = hashlib.sha256(pom).hexdigest()

    def done() -> bool:
        return libs.is_dir() and marker.is_file() and marker.read_text().strip() == digest

    if done():
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with _file_lock(home / ".lock"):
        if done():  # another process finished while we waited for the lock
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(
                f"Building the Kafka {KAFKA_VERSION} classpath needs Maven, but `mvn` is not on "
                "PATH (install it, e.g. `apt-get install maven`)."
            )
        _java()
        (home / "pom.xml").write_bytes(pom)
        partial = home / "libs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        print(
            f"loraloop: fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {libs} "
            "(one time, ~45 MB) ...",
            file=sys.stderr,
            flush=True,
        )
        started = time.monotonic()
        cmd = [
            mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(home / "pom.xml"),
            "dependency:copy-dependencies", "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, cwd=home, capture_output=True, text=True, timeout=_MVN_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"`mvn dependency:copy-dependencies` did not finish in {_MVN_TIMEOUT_S:.0f}s "
                f"(in {home}); is Maven Central reachable?"
            ) from exc
        jars = sorted(partial.glob("*.jar"))
        if proc.returncode != 0 or not any(j.name.startswith("kafka_2.13-") for j in jars):
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(
                f"`mvn dependency:copy-dependencies` failed (exit {proc.returncode}) in {home}; "
                "check access to Maven Central (or the mirrors in ~/.m2/settings.xml). "
                f"Output tail:\n{_tail(proc.stdout + proc.stderr)}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        partial.rename(libs)
        marker.write_text(digest + "\n")
        print(
            f"loraloop: {len(jars)} Kafka jars ready in {time.monotonic() - started:.1f}s.",
            file=sys.stderr,
            flush=True,
        )
    return libs


# --------------------------------------------------------------------------------------------
# broker
# --------------------------------------------------------------------------------------------


def free_port(exclude: Sequence[int] = ()) -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in exclude:
            return port


def _port_bindable(port: int) -> bool:
    """True when a listener could bind 127.0.0.1:`port` (as the JVM does: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _random_cluster_id() -> str:
    """A Kafka-style cluster id: a random UUID, base64url without padding, not starting '-'."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="file" fileName={file} filePattern={pattern}>
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="{level}"><AppenderRef ref="file"/></Root>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
  </Loggers>
</Configuration>
"""

_LIVE: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


@atexit.register
def _stop_live_brokers() -> None:
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop()


class KafkaBroker:
    """A single-node KRaft Kafka broker (combined broker+controller) in a child JVM.

    With `data_dir=None` the data lives in a temporary directory removed by `stop()`; with a
    directory, data survives `stop()`/`kill()` and a later `start()` (same object or a new
    one on the same directory) recovers it. Ports picked for `port=0` are kept for the life
    of the object, so clients reconnect after a restart.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        port: int = 0,
        partitions: int = 4,
        *,
        heap: str = "512m",
        log_level: str = "INFO",
    ) -> None:
        self._data_dir_arg = Path(data_dir) if data_dir is not None else None
        self._port = port
        self._port_auto = port == 0
        self._controller_port = 0
        self.partitions = partitions
        self.heap = heap
        self.log_level = log_level
        self._dir: Path | None = None
        self._owns_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The client (PLAINTEXT) port; 0 until the first `start()` when picked automatically."""
        return self._port

    @property
    def bootstrap(self) -> str:
        """Bootstrap string `127.0.0.1:<port>` for clients."""
        if not self._port:
            raise RuntimeError("KafkaBroker has no port yet: call start() first")
        return f"{HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker JVM, or None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the broker JVM is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path | None:
        """The directory holding config, logs and data (None before start / after cleanup)."""
        return self._dir

    @property
    def log_path(self) -> Path | None:
        """The broker's log file (log4j2), inside `data_dir`."""
        return self._dir / "server.log" if self._dir is not None else None

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the broker log and of the JVM's stdout/stderr."""
        if self._dir is None:
            return ""
        parts = []
        for name in ("server.log", "jvm.out"):
            path = self._dir / name
            if path.is_file() and path.stat().st_size:
                with open(path, "rb") as fh:
                    fh.seek(max(0, path.stat().st_size - 200_000))
                    text = fh.read().decode("utf-8", "replace")
                parts.append(f"--- {path} ---\n{_tail(text, lines)}")
        return "\n".join(parts)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker (formatting storage on first use); return the bootstrap string.

        Raises RuntimeError, with the log tail, if the JVM exits or is not ready in `timeout`.
        """
        if self.running:
            return self.bootstrap
        libs = ensure_kafka_jars()
        java = _java()
        deadline = time.monotonic() + timeout
        self._prepare_dir()
        try:
            return self._start(java, libs, deadline)
        except BaseException:
            if self._owns_dir:  # a failed start leaves no temporary directory behind
                self.stop()
            raise

    def _start(self, java: str, libs: Path, deadline: float) -> str:
        for attempt in range(3):
            self._pick_ports()
            self._write_config()
            self._format(java, libs)
            try:
                cluster_id = self._launch_and_wait(java, libs, deadline)
            except _PortTaken:
                if not self._port_auto or attempt == 2:
                    raise RuntimeError(
                        f"Kafka could not bind its ports ({self._port}, {self._controller_port})"
                        f": address already in use.\n{self.log_tail()}"
                    ) from None
                self._port = self._controller_port = 0  # lost a race for the port: pick again
                continue
            log.info("Kafka %s (cluster %s) ready at %s", KAFKA_VERSION, cluster_id, self.bootstrap)
            self._port_auto = False  # from now on the ports stay, so clients can reconnect
            _LIVE.add(self)
            return self.bootstrap
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after `timeout` s); idempotent.

        A temporary data directory created by `start()` is removed; a given one is kept.
        """
        self._stop_process(timeout)
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._owns_dir = False
        _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the broker JVM (a crash, for fault tests); data stays for a later `start()`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_out()

    def restart(self, timeout: float = 60.0) -> str:
        """Stop the JVM gracefully, keeping the data directory, and start it again."""
        self._stop_process()
        return self.start(timeout)

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"KafkaBroker({HOST}:{self._port}, {state}, data_dir={self._dir})"

    # -- internals ----------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        if self._dir is not None:
            return
        if self._data_dir_arg is None:
            self._dir = Path(tempfile.mkdtemp(prefix="loraloop-kafka-"))
            self._owns_dir = True
        else:
            self._dir = self._data_dir_arg.resolve()
            self._dir.mkdir(parents=True, exist_ok=True)

    def _pick_ports(self) -> None:
        if self._port == 0:
            self._port = free_port()
        elif not _port_bindable(self._port):
            raise RuntimeError(f"Kafka port {HOST}:{self._port} is already in use")
        if self._controller_port == 0 or not _port_bindable(self._controller_port):
            self._controller_port = free_port(exclude=(self._port,))

    def _properties(self) -> dict[str, object]:
        """The broker's server.properties, as a dict."""
        assert self._dir is not None
        logs = self._dir / "kafka-logs"
        voters = f"{_NODE_ID}@{HOST}:{self._controller_port}"
        return {
            "process.roles": "broker,controller",
            "node.id": _NODE_ID,
            # A static quorum: the controller endpoint is config, not part of the metadata
            # log, so a restart may move the controller port.
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{HOST}:{self._port},CONTROLLER://{HOST}:{self._controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self._port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": logs,
            "num.partitions": self.partitions,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "share.coordinator.state.topic.num.partitions": 4,
            "group.initial.rebalance.delay.ms": 0,
            # After a crash (kill()) the restarted broker may only register once the controller
            # has expired its previous session: keep that short (defaults 9 s / 2 s).
            "broker.session.timeout.ms": 4000,
            "broker.heartbeat.interval.ms": 1000,
            # Small machine, small broker.
            "num.network.threads": 2,
            "num.io.threads": 4,
            "num.recovery.threads.per.data.dir": 1,
            "background.threads": 4,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
        }

    def _write_config(self) -> None:
        assert self._dir is not None
        text = "".join(f"{key}={value}\n" for key, value in self._properties().items())
        (self._dir / "server.properties").write_text(
            "# Written by loraloop/devtools/kafka_broker.py on every start.\n" + text
        )
        log_file = self._dir / "server.log"
        (self._dir / "log4j2.xml").write_text(
            _LOG4J2_XML.format(
                file=quoteattr(str(log_file)),
                pattern=quoteattr(f"{log_file}.%i"),
                level=escape(self.log_level),
            )
        )

    def _jvm(self, java: str, libs: Path, *, heap: str) -> list[str]:
        assert self._dir is not None
        return [
            java,
            f"-Xmx{heap}",
            "-Xss512k",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._dir / 'log4j2.xml'}",
            f"-Dkafka.logs.dir={self._dir}",
            "-cp",
            f"{libs}{os.sep}*",
        ]

    def _format(self, java: str, libs: Path) -> None:
        """Format the storage directory once (StorageTool), keeping an existing cluster id."""
        assert self._dir is not None
        if (self._dir / "kafka-logs" / "meta.properties").is_file():
            return
        cmd = [
            *self._jvm(java, libs, heap="256m"),
            "kafka.tools.StorageTool", "format",
            "--cluster-id", self._new_cluster_id(),
            "--config", str(self._dir / "server.properties"),
            "--ignore-formatted",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(
                f"formatting Kafka storage in {self._dir} failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )

    def _new_cluster_id(self) -> str:
        """The cluster id a first start formats its storage with."""
        return _random_cluster_id()

    def _launch_and_wait(self, java: str, libs: Path, deadline: float) -> str:
        return self._wait_ready(self._launch(java, libs), deadline)

    def _launch(self, java: str, libs: Path) -> int:
        """Start the JVM; returns where the log stood before it (for `_wait_ready`)."""
        assert self._dir is not None
        log_file = self._dir / "server.log"
        log_offset = log_file.stat().st_size if log_file.is_file() else 0
        self._out = open(self._dir / "jvm.out", "ab")  # noqa: SIM115 - lives as long as the JVM
        self._out.write(f"\n=== start {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n".encode())
        self._out.flush()
        cmd = [
            *self._jvm(java, libs, heap=self.heap),
            "kafka.Kafka",
            str(self._dir / "server.properties"),
        ]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=self._dir,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it cleanly
        )
        return log_offset

    def _wait_ready(self, log_offset: int, deadline: float) -> str:
        """Wait until the launched JVM serves clients; returns the cluster id."""
        assert self._dir is not None and self._proc is not None
        log_file = self._dir / "server.log"
        expected = self._cluster_id()
        scanned = log_offset
        try:
            while True:
                rc = self._proc.poll()
                new_text, scanned = self._log_since(log_file, scanned)
                if "Address already in use" in new_text:
                    self.kill()  # a failed start shuts down slowly
                    raise _PortTaken
                if rc is not None:
                    self._close_out()
                    raise RuntimeError(
                        f"Kafka broker exited with code {rc} during start-up.\n{self.log_tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"Kafka broker not ready at {self.bootstrap} in time.\n{self.log_tail()}"
                    )
                cluster_id = self._answers(min(max(remaining, 0.5), 5.0))
                if cluster_id is not None and self._proc.poll() is None:
                    if expected and cluster_id != expected:
                        raise RuntimeError(
                            f"another Kafka cluster ({cluster_id}) answers at {self.bootstrap}"
                        )
                    return cluster_id
                time.sleep(0.1)
        except BaseException:
            self._stop_process(timeout=10)
            raise

    def _answers(self, timeout: float) -> str | None:
        """The cluster id once this broker serves clients, else None."""
        return ready_cluster_id(self.bootstrap, timeout)

    def _cluster_id(self) -> str:
        assert self._dir is not None
        meta = self._dir / "kafka-logs" / "meta.properties"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.partition("=")[2].strip()
        return ""

    @staticmethod
    def _log_since(path: Path, offset: int) -> tuple[str, int]:
        """Log text from about `offset` on (whole lines), and the offset to continue from."""
        if not path.is_file():
            return "", offset
        start = offset if path.stat().st_size >= offset else 0  # rolled over: from the top
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # leave a partial last line for the next call
        return data[:end].decode("utf-8", "replace"), start + end

    def _stop_process(self, timeout: float = 30.0) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Kafka pid %d ignored SIGTERM for %.0fs; killing", proc.pid, timeout)
                proc.kill()
                proc.wait()
        self._proc = None
        self._close_out()

    def _close_out(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class _PortTaken(Exception):
    """The JVM could not bind its listeners (someone took a picked port first)."""


# --------------------------------------------------------------------------------------------
# cluster
# --------------------------------------------------------------------------------------------


class _ClusterNode(KafkaBroker):
    """One node of a `KafkaCluster`: its ports and cluster id come from the cluster."""

    def __init__(self, cluster: KafkaCluster, node_id: int, data_dir: Path) -> None:
        super().__init__(
            data_dir, partitions=cluster.partitions, heap=cluster.heap, log_level=cluster.log_level
        )
        self.cluster = cluster
        self.node_id = node_id
        self._port_auto = False  # the cluster picked both ports; they never move

    def _pick_ports(self) -> None:
        for port in (self._port, self._controller_port):
            if not _port_bindable(port):
                raise RuntimeError(f"Kafka port {HOST}:{port} is already in use")

    def _properties(self) -> dict[str, object]:
        c = self.cluster
        rf, isr = c.replication_factor, c.min_insync_replicas
        return {
            **super()._properties(),
            "node.id": self.node_id,
            "controller.quorum.voters": c.voters,
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
        }

    def _new_cluster_id(self) -> str:
        return self.cluster.cluster_id

    def _answers(self, timeout: float) -> str | None:
        """Ready once the cluster counts this node among its live (unfenced) brokers."""
        cluster_id = ready_cluster_id(self.bootstrap, timeout)
        if cluster_id is None or self.node_id not in live_broker_ids(self.bootstrap, timeout):
            return None
        return cluster_id

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"KafkaCluster node {self.node_id} ({HOST}:{self._port}, {state})"


class KafkaCluster:
    """A KRaft Kafka cluster of `nodes` combined broker+controller nodes on 127.0.0.1.

    Every node is a broker and a voter of a static controller quorum
    (`controller.quorum.voters`), so the cluster keeps serving, and electing controllers
    and partition leaders, while a majority of nodes is up. Internal topics (consumer
    offsets, transactions) and default topics have `replication_factor` replicas (default:
    every node) and `min_insync_replicas` (default: one fewer). `nodes[i]` is a
    `KafkaBroker` to `kill()` (SIGKILL), `stop()`-less restart (`start()`) and inspect
    (`log_tail()`, `pid`); its data stays for its restart. Ports are picked once and kept.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        nodes: int = 3,
        partitions: int = 4,
        *,
        replication_factor: int | None = None,
        min_insync_replicas: int | None = None,
        heap: str = "384m",
        log_level: str = "INFO",
    ) -> None:
        if nodes < 1:
            raise ValueError("a Kafka cluster needs at least one node")
        self.partitions = partitions
        self.replication_factor = replication_factor or nodes
        self.min_insync_replicas = min_insync_replicas or max(1, self.replication_factor - 1)
        if not 1 <= self.min_insync_replicas <= self.replication_factor <= nodes:
            raise ValueError("need 1 <= min_insync_replicas <= replication_factor <= nodes")
        self.heap, self.log_level = heap, log_level
        self.cluster_id = _random_cluster_id()
        self._owns_dir = data_dir is None
        self._dir = (
            Path(tempfile.mkdtemp(prefix="loraloop-kafka-cluster-"))
            if data_dir is None
            else Path(data_dir)
        )
        self.nodes: list[KafkaBroker] = [
            _ClusterNode(self, i, self._dir / f"node-{i}") for i in range(1, nodes + 1)
        ]

    @property
    def voters(self) -> str:
        """`controller.quorum.voters`: id@host:controller-port of every node."""
        return ",".join(f"{n.node_id}@{HOST}:{n._controller_port}" for n in self._members())

    @property
    def bootstrap(self) -> str:
        """Every node's client address, comma-separated (clients find the others)."""
        return ",".join(node.bootstrap for node in self.nodes)

    def _members(self) -> list[_ClusterNode]:
        return [n for n in self.nodes if isinstance(n, _ClusterNode)]

    def start(self, timeout: float = 120.0) -> str:
        """Start every node (all at once: a lone voter cannot elect a controller) and wait
        until each is a live broker; returns the bootstrap string."""
        libs, java = ensure_kafka_jars(), _java()
        deadline = time.monotonic() + timeout
        members = self._members()
        if not members[0].port:  # first start: distinct ports for every listener
            taken: list[int] = []
            for node in members:
                node._port = free_port(exclude=taken)
                node._controller_port = free_port(exclude=[*taken, node._port])
                taken += [node._port, node._controller_port]
        try:
            offsets = {}
            for node in members:
                if node.running:
                    continue
                node._prepare_dir()
                node._pick_ports()
                node._write_config()
                node._format(java, libs)
                offsets[node.node_id] = node._launch(java, libs)
            for node in members:
                if node.node_id in offsets:
                    node._wait_ready(offsets[node.node_id], deadline)
                    _LIVE.add(node)
        except BaseException:
            self.stop()
            raise
        log.info(
            "Kafka cluster %s of %d nodes ready at %s",
            self.cluster_id,
            len(members),
            self.bootstrap,
        )
        return self.bootstrap

    def wait_live(self, count: int, timeout: float = 60.0) -> list[int]:
        """Wait until exactly `count` brokers are live (registered, unfenced) as the cluster
        says, e.g. until a killed node is fenced; returns their ids."""
        deadline = time.monotonic() + timeout
        while True:
            up = [n for n in self.nodes if n.running]
            ids = live_broker_ids(",".join(n.bootstrap for n in up), 5.0) if up else []
            if len(ids) == count:
                return ids
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(ids)} of {count} Kafka brokers live after {timeout:.0f}s")
            time.sleep(0.2)

    def restart_stopped(self, timeout: float = 120.0) -> None:
        """Start again every node that was killed or stopped (its data kept), and wait
        until all of them are live brokers again."""
        for node in self.nodes:
            if not node.running:
                node.start(timeout)
        self.wait_live(len(self.nodes), timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop every node (SIGTERM to all at once, SIGKILL after `timeout` s: one by one,
        the last nodes would wait for a quorum that has gone); a temporary data directory
        is removed."""
        for node in self.nodes:
            proc = node._proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.stop(max(deadline - time.monotonic(), 0.1))
        if self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
