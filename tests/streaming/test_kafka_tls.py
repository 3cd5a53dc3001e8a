"""Kafka clients over real mutual TLS: a real Tansu broker behind a TLS terminator that the
broker advertises (``tls_kafka`` in tests/conftest.py), so every client must use the settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streaming.errors import BrokerUnreachable
from streaming.kafka_io import TopicReader, create_topics, json_producer
from streaming.kafka_settings import KafkaSettings

pytestmark = pytest.mark.kafka


def test_producer_admin_and_reader_round_trip_over_mutual_tls(tls_kafka):
    bootstrap, settings = tls_kafka.bootstrap_servers, tls_kafka.settings
    create_topics(bootstrap, ["tls"], partitions=2, settings=settings)
    producer = json_producer(bootstrap, settings)
    for i in range(20):
        producer.send("tls", key=f"u{i}", value={"i": i})
    producer.flush()
    producer.close()
    with TopicReader(bootstrap, "tls", settings=settings) as reader:
        got = [json.loads(r.value)["i"] for b in reader.batches(limit=20, idle_timeout_s=5.0)
               for r in b]
    assert sorted(got) == list(range(20))


def test_a_client_without_the_settings_does_not_get_through(tls_kafka):
    with pytest.raises(BrokerUnreachable):
        create_topics(tls_kafka.bootstrap_servers, ["plain"], timeout_ms=1500)
    # TLS with the CA but no client certificate: the terminator refuses the handshake
    no_cert = KafkaSettings(security_protocol="SSL", ssl_cafile=tls_kafka.settings.ssl_cafile)
    with pytest.raises(BrokerUnreachable):
        create_topics(tls_kafka.bootstrap_servers, ["nocert"], timeout_ms=1500, settings=no_cert)


def test_dead_letter_sink_over_tls(tls_kafka):
    from streaming.deadletter import KafkaDeadLetterSink
    from streaming.validation import validate_event

    letter = validate_event(b"junk")
    sink = KafkaDeadLetterSink(tls_kafka.bootstrap_servers, settings=tls_kafka.settings)
    sink.write(letter)
    sink.close()
    with TopicReader(tls_kafka.bootstrap_servers, sink.topic, settings=tls_kafka.settings) as r:
        records = [x for b in r.batches(limit=1, idle_timeout_s=5.0) for x in b]
    assert json.loads(records[0].value)["reason"] == "bad_json"


def test_confluent_kafka_bench_producer_over_tls(tls_kafka):
    from pipelines.load_bench import TOPIC, fast_producer

    bootstrap, settings = tls_kafka.bootstrap_servers, tls_kafka.settings
    create_topics(bootstrap, [TOPIC], partitions=1, settings=settings)
    errors = []
    producer = fast_producer(bootstrap, lambda err, msg: errors.append(err), settings=settings)
    for i in range(10):
        producer.produce(TOPIC, json.dumps({"i": i}).encode())
    assert producer.flush(30) == 0
    assert errors == [None] * 10
    with TopicReader(bootstrap, TOPIC, settings=settings) as reader:
        assert sum(len(b) for b in reader.batches(limit=10, idle_timeout_s=5.0)) == 10


def test_bench_bare_consumer_over_tls(tls_kafka):
    from streaming import kafka_io

    bootstrap, settings = tls_kafka.bootstrap_servers, tls_kafka.settings
    create_topics(bootstrap, ["bare"], partitions=1, settings=settings)
    consumer = kafka_io.consumer(bootstrap, settings, consumer_timeout_ms=5000)
    assert consumer.partitions_for_topic("bare") == {0}
    consumer.close()


def test_dynllm_produce_over_tls_from_a_config_file(tls_kafka, cj_small, tmp_path):
    files = tls_kafka.files
    config = tmp_path / "kafka.toml"
    config.write_text(f'[kafka]\nsecurity_protocol = "SSL"\nssl_cafile = "{files["ca"]}"\n'
                      f'ssl_certfile = "{files["client_cert"]}"\n'
                      f'ssl_keyfile = "{files["client_key"]}"\n')
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "produce", "--data", str(cj_small),
         "--limit", "50", "--bootstrap-servers", tls_kafka.bootstrap_servers,
         "--kafka-config", str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "50 delivered" in done.stdout
    with TopicReader(tls_kafka.bootstrap_servers, "purchases",
                     settings=tls_kafka.settings) as reader:
        assert sum(len(b) for b in reader.batches(limit=50, idle_timeout_s=5.0)) == 50
