"""Shared fixtures: real data slices. Room-specific fixtures live in tests/<room>/conftest.py."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: The small real slice used across the suite: weeks 1-4 of Complete Journey, users and items
#: with at least 5 events, first 20k events.
CJ_SMALL = {"weeks": (1, 4), "min_user_events": 5, "min_item_events": 5, "max_events": 20_000}


@pytest.fixture(scope="session")
def cj_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset directory holding a small real Complete Journey slice (see ``CJ_SMALL``)."""
    from streaming.completejourney import prepare

    out = tmp_path_factory.mktemp("cj_small")
    prepare(out, **CJ_SMALL)
    return out


@pytest.fixture
def kafka_broker():
    """``"127.0.0.1:PORT"`` of a fresh local Tansu broker (memory-only, starts in ~70 ms)."""
    from streaming.broker import Broker

    with Broker() as broker:
        yield broker.bootstrap_servers


def _test_certificates(out: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1/localhost and a client certificate,
    as PEM files in ``out`` (``ca``, ``server_cert``, ``server_key``, ``client_cert``,
    ``client_key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder("dynllm test CA", name("dynllm test CA"), ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": out / "ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (builder(f"dynllm test {role}", ca.subject, key.public_key())
                .add_extension(aki, critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"),
                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[f"{role}_cert"], files[f"{role}_key"] = out / f"{role}.pem", out / f"{role}.key"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return files


class TlsTerminator:
    """Mutual TLS in front of a plaintext broker, as a TLS-terminating load balancer or stunnel
    would put it: accepts TLS on ``port`` (client certificate signed by the CA required) and
    passes the bytes on to ``upstream``. Tansu 0.6's own TLS flags do not work (docs/kafka.md)."""

    def __init__(self, port: int, upstream: tuple[str, int], context: ssl.SSLContext) -> None:
        self.port, self.upstream, self.context = port, upstream, context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tls-terminator")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.context))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files of a test CA, a server and a client certificate (see ``_test_certificates``)."""
    return _test_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_kafka(tls_files: dict[str, Path]):
    """A real Tansu broker reachable **only over mutual TLS**: clients connect to a TLS
    terminator that the broker advertises in its metadata. Yields ``bootstrap_servers`` (the
    TLS address), ``settings`` (a :class:`~streaming.kafka_settings.KafkaSettings` with the CA
    and the client certificate) and ``files``."""
    from streaming.broker import Broker, free_port
    from streaming.kafka_settings import KafkaSettings

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls_files["ca"]))
    context.load_cert_chain(tls_files["server_cert"], tls_files["server_key"])
    context.verify_mode = ssl.CERT_REQUIRED
    port = free_port()
    with Broker(advertise=f"127.0.0.1:{port}") as broker, \
            TlsTerminator(port, (broker.host, broker.port), context):
        settings = KafkaSettings(security_protocol="SSL", ssl_cafile=str(tls_files["ca"]),
                                 ssl_certfile=str(tls_files["client_cert"]),
                                 ssl_keyfile=str(tls_files["client_key"]))
        yield SimpleNamespace(bootstrap_servers=f"127.0.0.1:{port}", settings=settings,
                              files=tls_files)


@pytest.fixture
def prometheus():
    """Factory starting **real Prometheus servers** (Debian ``prometheus``) on loopback.

    Call it with job name → ``["host:port", ...]`` targets that serve ``/metrics`` (and optionally
    ``rule_files=[...]`` to evaluate); it returns a started
    :class:`streaming.prometheus_server.PrometheusServer` scraping them every second (generated
    config, free port, temp storage dir; all stopped and deleted at teardown). Query it with
    ``.query(promql)`` (raw result list), ``.value(promql)`` (one number or None),
    ``.wait_for(promql, accept, timeout_s)`` and ``.api("rules")`` for other API endpoints. The
    first scrape lands ~5 s after start, so wait for ``up`` before asserting, and use rate
    windows of at least ``[5s]``::

        def test_pipeline_metrics(kafka_broker, prometheus):
            metrics_port = ...  # start the process under test with its metrics server
            prom = prometheus({"pipeline": [f"127.0.0.1:{metrics_port}"]})
            prom.wait_for('up{job="pipeline"}', lambda v: v == 1)
            prom.wait_for("sum(dynllm_events_dead_lettered_total)", lambda v: v == n_bad)
            assert prom.value("sum(rate(dynllm_events_consumed_total[5s]))") > 0

    Metrics are process-global: if the code under test runs inside the pytest process (its
    ``start_metrics_server(0)`` port as the target), counters still hold what earlier tests added,
    so assert differences from a value read first, or run the process under test as a
    subprocess. A missing binary fails with a UsageError telling to run ``make prometheus``.
    """
    from streaming.prometheus_server import PrometheusServer

    servers = []

    def start(targets, scrape_interval_s: float = 1.0, rule_files=()) -> PrometheusServer:
        server = PrometheusServer(targets, scrape_interval_s, rule_files=rule_files).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
