"""Kafka security settings: one file and/or the environment, validated, never shown."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from streaming.errors import BrokerUnreachable, UsageError
from streaming.kafka_settings import PLAINTEXT, KafkaSettings, settings_from_args

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55word"


def _scram(**extra) -> KafkaSettings:
    return KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                         sasl_username="svc", sasl_password=SECRET, **extra)


def test_toml_properties_and_environment_give_the_same_settings(tmp_path, tls_files):
    toml = tmp_path / "kafka.toml"
    toml.write_text(f'[kafka]\nsecurity_protocol = "sasl_ssl"\nssl_cafile = "{tls_files["ca"]}"\n'
                    f'sasl_mechanism = "scram-sha-256"\nsasl_username = "svc"\n'
                    f'sasl_password = "{SECRET}"\nssl_check_hostname = false\n')
    props = tmp_path / "client.properties"
    props.write_text(f"# librdkafka names\nsecurity.protocol=SASL_SSL\n"
                     f"ssl.ca.location={tls_files['ca']}\nsasl.mechanisms=SCRAM-SHA-256\n"
                     f"sasl.username=svc\nsasl.password={SECRET}\n"
                     "ssl.endpoint.identification.algorithm=none\n")
    env = {"DYNLLM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "DYNLLM_KAFKA_SSL_CAFILE":
           str(tls_files["ca"]), "DYNLLM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
           "DYNLLM_KAFKA_SASL_USERNAME": "svc", "DYNLLM_KAFKA_SASL_PASSWORD": SECRET,
           "DYNLLM_KAFKA_SSL_CHECK_HOSTNAME": "false"}
    expected = KafkaSettings("SASL_SSL", ssl_cafile=str(tls_files["ca"]), ssl_check_hostname=False,
                             sasl_mechanism="SCRAM-SHA-256", sasl_username="svc",
                             sasl_password=SECRET)
    assert KafkaSettings.from_file(toml) == KafkaSettings.from_file(props) == expected
    assert KafkaSettings.from_env(env) == expected
    assert KafkaSettings.load(None, {"DYNLLM_KAFKA_CONFIG": str(props)}) == expected
    assert KafkaSettings.load(None, {}) == PLAINTEXT


def test_environment_overrides_the_file(tmp_path):
    config = tmp_path / "kafka.properties"
    config.write_text("security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\n"
                      "sasl.username=svc\nsasl.password=old\n")
    merged = KafkaSettings.load(config, {"DYNLLM_KAFKA_SASL_PASSWORD": SECRET})
    assert (merged.sasl_mechanism, merged.sasl_password) == ("PLAIN", SECRET)


def test_client_arguments_for_kafka_python_and_librdkafka(tls_files):
    tls = KafkaSettings("SSL", ssl_cafile=str(tls_files["ca"]),
                        ssl_certfile=str(tls_files["client_cert"]),
                        ssl_keyfile=str(tls_files["client_key"]))
    assert tls.kafka_python_kwargs() == {
        "security_protocol": "SSL", "ssl_cafile": str(tls_files["ca"]),
        "ssl_certfile": str(tls_files["client_cert"]),
        "ssl_keyfile": str(tls_files["client_key"]), "ssl_check_hostname": True}
    assert tls.librdkafka_config() == {
        "security.protocol": "ssl", "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": str(tls_files["ca"]),
        "ssl.certificate.location": str(tls_files["client_cert"]),
        "ssl.key.location": str(tls_files["client_key"])}
    assert _scram().kafka_python_kwargs() == {
        "security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc", "sasl_plain_password": SECRET}
    assert _scram().librdkafka_config()["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert PLAINTEXT.kafka_python_kwargs() == {} and PLAINTEXT.librdkafka_config() == {}


def test_the_security_settings_win_over_per_client_options():
    from streaming.kafka_io import client_config, librdkafka_config

    merged = client_config("h:1", _scram(), security_protocol="PLAINTEXT", linger_ms=5)
    assert merged["security_protocol"] == "SASL_PLAINTEXT" and merged["linger_ms"] == 5
    assert librdkafka_config("h:1", _scram(), **{"sasl.password": "x"})["sasl.password"] == SECRET


def test_the_password_is_masked(tmp_path):
    settings = _scram()
    assert SECRET not in repr(settings) and SECRET not in str(settings)
    assert "sasl_password='***'" in repr(settings)
    assert SECRET not in settings.describe() and "SCRAM-SHA-512" in settings.describe()
    assert SECRET not in f"{settings}" and SECRET not in repr([settings])


def test_no_command_takes_a_password_on_the_command_line():
    from pipelines.cli import build_parser

    parser = build_parser()
    for argv in (["run", "--bootstrap-servers", "h:1", "--run", "r"],
                 ["serve", "--run", "r", "--state-dir", "s"], ["produce", "--data", "d"],
                 ["worker", "--bootstrap-servers", "h:1", "--data", "d"]):
        assert parser.parse_args(argv + ["--kafka-config", "k.toml"]).kafka_config == "k.toml"
        for option in ("--sasl-password", "--password", "--kafka-password"):
            with pytest.raises(SystemExit):
                parser.parse_args(argv + [option, SECRET])
    helps = parser.format_help()
    assert "password" not in helps.replace("DYNLLM_KAFKA_SASL_PASSWORD", "")


def test_a_failing_sasl_client_logs_no_password(tls_kafka, caplog):
    """A SASL_SSL client against the real broker behind TLS: the broker offers no SASL, the
    client retries and logs at DEBUG; the password is nowhere in the log or the error.
    (``KafkaAdminClient`` logs its whole configuration at DEBUG: the filter ``dynllm``
    installs at start masks it; without the filter this test fails.)"""
    from streaming.kafka_io import install_log_filters

    install_log_filters()  # as the dynllm entry point does
    files = tls_kafka.files
    settings = KafkaSettings("SASL_SSL", ssl_cafile=str(files["ca"]),
                             ssl_certfile=str(files["client_cert"]),
                             ssl_keyfile=str(files["client_key"]),
                             sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                             sasl_password=SECRET)
    from streaming.kafka_io import create_topics

    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerUnreachable) as failure:
        create_topics(tls_kafka.bootstrap_servers, ["t"], timeout_ms=2000, settings=settings)
    assert "SaslHandshake" in caplog.text or "Sasl" in caplog.text  # it got as far as SASL
    assert SECRET not in caplog.text and SECRET not in str(failure.value)


@pytest.mark.parametrize("values, message", [
    ({"security_protocol": "SSL", "ssl_cafile": "/no/such/ca.pem"}, "ssl_cafile /no/such/ca.pem"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u",
      "sasl_password": "p"}, "sasl_mechanism 'GSSAPI' is not one of PLAIN, SCRAM-SHA-256"),
    ({"security_protocol": "TLS"}, "security_protocol 'TLS' is not one of"),
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN"},
     "needs sasl_username and sasl_password"),
    ({"sasl_username": "u"}, "SASL settings are set but security_protocol is PLAINTEXT"),
    ({"sasl_pasword": "p"}, "unknown Kafka setting 'sasl_pasword'"),
    ({"ssl_check_hostname": "maybe", "security_protocol": "SSL"}, "must be true or false"),
])
def test_bad_settings_are_one_usage_error_line(values, message):
    with pytest.raises(UsageError) as error:
        KafkaSettings.from_mapping(values, "test")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_config_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    from pipelines.cli import main

    config = tmp_path / "kafka.properties"
    config.write_text(f"security.protocol=SASL_SSL\nsasl.mechanism=OAUTHBEARER\n"
                      f"sasl.username=u\nsasl.password={SECRET}\n")
    assert main(["produce", "--data", str(tmp_path), "--kafka-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sasl_mechanism 'OAUTHBEARER'" in err and SECRET not in err
    assert main(["produce", "--data", str(tmp_path), "--kafka-config",
                 str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml: cannot be read" in capsys.readouterr().err


def test_settings_from_args_reads_the_environment_given():
    import argparse

    args = argparse.Namespace(kafka_config=None)
    env = {"DYNLLM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "DYNLLM_KAFKA_SASL_MECHANISM":
           "PLAIN", "DYNLLM_KAFKA_SASL_USERNAME": "u", "DYNLLM_KAFKA_SASL_PASSWORD": SECRET}
    assert settings_from_args(args, env).sasl_password == SECRET


#: The only places that may construct a Kafka client, each from the merged settings:
#: kafka_io.client_config (kafka-python) and kafka_io.librdkafka_config (confluent-kafka).
CLIENT_BUILDERS = {("streaming/kafka_io.py", "KafkaProducer"), ("streaming/kafka_io.py",
                                                                 "KafkaConsumer"),
                   ("streaming/kafka_io.py", "KafkaAdminClient"),
                   ("pipelines/load_bench.py", "Producer")}


def test_every_kafka_client_is_built_in_one_place():
    """No module builds a Kafka client except through ``streaming.kafka_io`` (and the bench's
    librdkafka producer, from ``kafka_io.librdkafka_config``); each such call passes the
    merged configuration only."""
    found = set()
    for room in ("streaming", "pipelines", "profiles", "tgn", "benchmarks"):
        for path in (ROOT / room).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("KafkaProducer", "KafkaConsumer", "KafkaAdminClient", "Producer",
                            "Consumer", "AdminClient"):
                    where = (str(path.relative_to(ROOT)), name)
                    assert where in CLIENT_BUILDERS, f"{where}: build it in streaming/kafka_io"
                    arg = node.args[0] if node.args else node.keywords[0].value
                    called = getattr(getattr(arg, "func", None), "id", None)
                    assert called in ("client_config", None), ast.unparse(node)
                    found.add(where)
    assert found == CLIENT_BUILDERS
    source = (ROOT / "pipelines/load_bench.py").read_text()
    assert "config = librdkafka_config(bootstrap_servers, settings" in source


@pytest.mark.kafka
def test_dynllm_process_shows_no_password_in_its_arguments_or_debug_log(kafka_broker, cj_small,
                                                                       tmp_path):
    """``dynllm -v produce`` with the password in ``DYNLLM_KAFKA_SASL_PASSWORD``, against the
    real broker (which offers no SASL): while it retries, neither its command line (what ``ps``
    shows) nor its DEBUG log holds the password."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "DYNLLM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "DYNLLM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "DYNLLM_KAFKA_SASL_USERNAME": "svc",
           "DYNLLM_KAFKA_SASL_PASSWORD": SECRET}
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "-v", "produce", "--data", str(cj_small),
             "--limit", "5", "--bootstrap-servers", kafka_broker],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while "UnsupportedSaslMechanism" not in log.read_text():  # it reached the SASL step
            assert child.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    finally:
        child.kill()
        child.wait()
    assert "produce" in cmdline and SECRET not in cmdline
    text = log.read_text()
    assert " DEBUG " in text and SECRET not in text
