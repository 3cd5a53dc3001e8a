"""Kafka client security settings (TLS, SASL), read from one config file and/or the environment.

Every Kafka client dynllm builds — the pipeline's readers and writers, the profile worker, the
producer, the server's changelog follower, the benches' producers and consumers — takes one
:class:`KafkaSettings` and turns it into client arguments here, and nowhere else:
:meth:`KafkaSettings.kafka_python_kwargs` for kafka-python (``KafkaProducer``,
``KafkaConsumer``, ``KafkaAdminClient``) and :meth:`KafkaSettings.librdkafka_config` for
confluent-kafka. The bootstrap servers stay a command-line option; the secrets never are.

Where the settings come from (:meth:`KafkaSettings.load`), later sources overriding earlier:

1. the file named by ``--kafka-config FILE`` or, without it, by ``$DYNLLM_KAFKA_CONFIG``:
   TOML (``*.toml``; the keys at top level or in a ``[kafka]`` table) or Java/librdkafka-style
   properties (any other name; ``key=value`` lines, ``#`` comments);
2. environment variables ``DYNLLM_KAFKA_<FIELD>``, e.g. ``DYNLLM_KAFKA_SASL_PASSWORD``.

Keys (file keys may also be written with dots, as librdkafka names them):

=========================  ============================================  =====================
field / TOML key           properties alias                              environment variable
=========================  ============================================  =====================
``security_protocol``      ``security.protocol``                         ``..._SECURITY_PROTOCOL``
``ssl_cafile``             ``ssl.ca.location``                           ``..._SSL_CAFILE``
``ssl_certfile``           ``ssl.certificate.location``                  ``..._SSL_CERTFILE``
``ssl_keyfile``            ``ssl.key.location``                          ``..._SSL_KEYFILE``
``ssl_check_hostname``     ``ssl.endpoint.identification.algorithm``     ``..._SSL_CHECK_HOSTNAME``
``sasl_mechanism``         ``sasl.mechanism`` / ``sasl.mechanisms``      ``..._SASL_MECHANISM``
``sasl_username``          ``sasl.username``                             ``..._SASL_USERNAME``
``sasl_password``          ``sasl.password``                             ``..._SASL_PASSWORD``
=========================  ============================================  =====================

There is deliberately no command-line option for the password (it would show in ``ps``), and
``repr``/``str`` of the settings print ``sasl_password='***'``. Bad settings (an unknown
protocol or mechanism, a missing CA file, SASL without a username) raise one
:class:`~streaming.errors.UsageError` line, which ``dynllm`` prints and exits 2 on.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.errors import UsageError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Environment variable naming the config file when ``--kafka-config`` is not given.
CONFIG_ENV = "DYNLLM_KAFKA_CONFIG"
#: Prefix of the per-field environment variables.
ENV_PREFIX = "DYNLLM_KAFKA_"
MASK = "***"

#: Properties-style (librdkafka) names accepted in a config file, beside the field names.
_ALIASES = {
    "security.protocol": "security_protocol",
    "ssl.ca.location": "ssl_cafile",
    "ssl.certificate.location": "ssl_certfile",
    "ssl.key.location": "ssl_keyfile",
    "ssl.endpoint.identification.algorithm": "ssl_check_hostname",
    "sasl.mechanism": "sasl_mechanism",
    "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username",
    "sasl.password": "sasl_password",
}
_TRUE = {"1", "true", "yes", "on", "https"}
_FALSE = {"0", "false", "no", "off", "none", ""}


@dataclass(frozen=True)
class KafkaSettings:
    """How a Kafka client authenticates and encrypts; the default is plaintext, no SASL.

    A value object: Beam pickles it into the DoFns that build clients, so workers get the
    settings as data. Validated on construction (``UsageError`` with one line).

    Attributes:
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
        ssl_cafile: PEM file of the CA(s) that signed the brokers' certificates (``None``: the
            system's trust store).
        ssl_certfile: PEM client certificate for mutual TLS (may also hold the key).
        ssl_keyfile: PEM private key of ``ssl_certfile``.
        ssl_check_hostname: Whether the broker certificate must name the host connected to.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512`` (SASL protocols).
        sasl_username: SASL user name.
        sasl_password: SASL password; masked in ``repr``/``str``.
    """

    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None

    def __post_init__(self) -> None:
        protocol = self.security_protocol.upper()
        object.__setattr__(self, "security_protocol", protocol)
        if protocol not in SECURITY_PROTOCOLS:
            raise UsageError(f"Kafka security_protocol {self.security_protocol!r} is not one of "
                             f"{', '.join(SECURITY_PROTOCOLS)}")
        if self.sasl_mechanism is not None:
            object.__setattr__(self, "sasl_mechanism", self.sasl_mechanism.upper())
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise UsageError(f"Kafka {name} {path} does not exist (or is not a file)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise UsageError("Kafka ssl_keyfile is set without ssl_certfile")
        uses_tls = protocol in ("SSL", "SASL_SSL")
        if not uses_tls and (self.ssl_cafile or self.ssl_certfile):
            raise UsageError(f"Kafka TLS files are set but security_protocol is {protocol} "
                             "(use SSL or SASL_SSL)")
        if protocol.startswith("SASL_"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise UsageError(f"Kafka sasl_mechanism {self.sasl_mechanism!r} is not one of "
                                 f"{', '.join(SASL_MECHANISMS)}")
            if not self.sasl_username or self.sasl_password is None:
                raise UsageError(f"Kafka {protocol} needs sasl_username and sasl_password "
                                 f"(config file or {ENV_PREFIX}SASL_USERNAME/_PASSWORD)")
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password is not None:
            raise UsageError(f"Kafka SASL settings are set but security_protocol is {protocol} "
                             "(use SASL_PLAINTEXT or SASL_SSL)")

    def __repr__(self) -> str:
        fields = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "sasl_password" and value is not None:
                value = MASK
            fields.append(f"{field.name}={value!r}")
        return f"KafkaSettings({', '.join(fields)})"

    __str__ = __repr__

    @property
    def is_plaintext(self) -> bool:
        """No TLS and no SASL (the local broker's settings)."""
        return self.security_protocol == "PLAINTEXT"

    def describe(self) -> str:
        """A short, secret-free description for log lines, e.g. ``SASL_SSL SCRAM-SHA-512 as
        'svc'``."""
        parts = [self.security_protocol]
        if self.sasl_mechanism:
            parts.append(f"{self.sasl_mechanism} as {self.sasl_username!r}")
        if self.ssl_certfile:
            parts.append("client certificate")
        return " ".join(parts)

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's ``KafkaProducer``/``KafkaConsumer``/
        ``KafkaAdminClient`` (empty for plaintext, so local-broker clients are unchanged)."""
        if self.is_plaintext:
            return {}
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            kwargs.update(ssl_cafile=self.ssl_cafile, ssl_certfile=self.ssl_certfile,
                          ssl_keyfile=self.ssl_keyfile, ssl_check_hostname=self.ssl_check_hostname)
        if self.sasl_mechanism:
            kwargs.update(sasl_mechanism=self.sasl_mechanism,
                          sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        return kwargs

    def librdkafka_config(self) -> dict[str, str]:
        """Settings for confluent-kafka (librdkafka names; empty for plaintext)."""
        if self.is_plaintext:
            return {}
        config = {"security.protocol": self.security_protocol.lower()}
        if self.security_protocol in ("SSL", "SASL_SSL"):
            config["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none")
            for key, value in (("ssl.ca.location", self.ssl_cafile),
                               ("ssl.certificate.location", self.ssl_certfile),
                               ("ssl.key.location", self.ssl_keyfile)):
                if value:
                    config[key] = value
        if self.sasl_mechanism:
            config.update({"sasl.mechanisms": self.sasl_mechanism,
                           "sasl.username": self.sasl_username or "",
                           "sasl.password": self.sasl_password or ""})
        return config

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> KafkaSettings:
        """Settings from ``{field or alias: value}``; unknown keys are refused (typos)."""
        return cls(**_fields(values, source))

    @classmethod
    def from_file(cls, path: str | Path) -> KafkaSettings:
        """Settings from a TOML (``*.toml``) or properties file."""
        return cls(**_file_fields(Path(path)))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> KafkaSettings:
        """Settings from ``DYNLLM_KAFKA_<FIELD>`` variables (the config-file variable aside)."""
        return cls(**_env_fields(environ))

    @classmethod
    def load(cls, config_file: str | Path | None, environ: Mapping[str, str]) -> KafkaSettings:
        """The file (``config_file``, else ``$DYNLLM_KAFKA_CONFIG``, else none), then the
        ``DYNLLM_KAFKA_*`` variables over it; validated once, on the merged result."""
        path = config_file or environ.get(CONFIG_ENV) or None
        values = _file_fields(Path(path)) if path else {}
        return cls(**{**values, **_env_fields(environ)})


PLAINTEXT = KafkaSettings()

_FIELD_NAMES = {f.name for f in dataclasses.fields(KafkaSettings)}


def _coerce(name: str, value: Any, source: str) -> Any:
    if name != "ssl_check_hostname":
        if isinstance(value, (dict, list)):
            raise UsageError(f"{source}: {name} must be a single value")
        return None if value is None else str(value)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{source}: ssl_check_hostname must be true or false, got {value!r}")


def _fields(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = _ALIASES.get(key.strip().lower(), key.strip().lower().replace(".", "_"))
        if name not in _FIELD_NAMES:
            raise UsageError(f"{source}: unknown Kafka setting {key!r} (known: "
                             f"{', '.join(sorted(_FIELD_NAMES))})")
        out[name] = _coerce(name, value, source)
    return out


def _file_fields(path: Path) -> dict[str, Any]:
    source = f"Kafka config {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{source}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{source}: not valid TOML ({exc})") from None
        table = data.get("kafka", data)
        if not isinstance(table, dict):
            raise UsageError(f"{source}: [kafka] must be a table")
        return _fields(table, source)
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UsageError(f"{source}:{number}: expected key=value")
        values[key.strip()] = value.strip()
    return _fields(values, source)


def _env_fields(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {key[len(ENV_PREFIX):]: value for key, value in environ.items()
              if key.startswith(ENV_PREFIX) and key != CONFIG_ENV}
    return _fields(values, "environment DYNLLM_KAFKA_*")


def add_kafka_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--kafka-config FILE``: the one command-line option for Kafka security settings."""
    parser.add_argument(
        "--kafka-config", metavar="FILE",
        help="Kafka TLS/SASL client settings (TOML or properties; default $DYNLLM_KAFKA_CONFIG); "
             "DYNLLM_KAFKA_* variables override it, e.g. DYNLLM_KAFKA_SASL_PASSWORD "
             "(docs/kafka.md, 'Connecting to a production Kafka')")


def settings_from_args(args: argparse.Namespace,
                       environ: Mapping[str, str] | None = None) -> KafkaSettings:
    """The settings for a parsed command line (``--kafka-config``) and the environment
    (``os.environ`` unless given)."""
    return KafkaSettings.load(getattr(args, "kafka_config", None),
                              os.environ if environ is None else environ)
