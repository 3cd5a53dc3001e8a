"""``dynllm produce`` / ``bench kafka`` / ``broker``: results, and one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.cli import main
from streaming.broker import accepts_connections, free_port
from streaming.kafka_io import TopicReader


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [
    ["produce", "--data", "/nonexistent/dataset"],
    ["bench", "kafka", "--data", "/nonexistent/dataset"],
])
def test_missing_dataset_is_one_line_exit_2(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dynllm: error:")


def test_unreachable_broker_is_one_line_exit_2(capsys, cj_small):
    start = time.monotonic()
    code, _, err = run_cli(capsys, "produce", "--data", str(cj_small),
                           "--bootstrap-servers", f"127.0.0.1:{free_port()}")
    assert code == 2 and "no Kafka broker answers" in err and err.count("\n") == 1
    assert time.monotonic() - start < 5  # no 30 s kafka-python bootstrap wait


@pytest.mark.parametrize("argv", [
    ["produce", "--data", "d", "--rate", "0"],
    ["produce", "--data", "d", "--limit", "ten"],
    ["produce", "--data", "d", "--skip", "-1"],
    ["produce", "--data", "d", "--rate", "5", "--speedup", "2"],
    ["broker", "--port", "70000"],
    ["bench", "kafka", "--events", "-3"],
])
def test_bad_arguments_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.kafka
def test_produce_sends_the_first_events_in_time_order(capsys, kafka_broker, cj_small):
    code, out, _ = run_cli(capsys, "produce", "--data", str(cj_small), "--topic", "p",
                           "--bootstrap-servers", kafka_broker, "--limit", "200",
                           "--rate", "5000", "--partitions", "1")
    assert code == 0
    assert "sent 200 events to 'p': 200 delivered, 0 failed" in out
    with TopicReader(kafka_broker, "p") as reader:
        records = [r for b in reader.batches(limit=200, idle_timeout_s=10) for r in b]
    assert len(records) == 200 and [r.offset for r in records] == list(range(200))


@pytest.mark.kafka
def test_produce_split_sends_only_that_split(capsys, kafka_broker, cj_small):
    from streaming.dataset import Dataset

    test = Dataset.load(cj_small).split("test")
    code, out, _ = run_cli(capsys, "produce", "--data", str(cj_small), "--topic", "p-test",
                           "--bootstrap-servers", kafka_broker, "--split", "test",
                           "--limit", "50", "--partitions", "1")
    assert code == 0 and "sent 50 events" in out
    with TopicReader(kafka_broker, "p-test") as reader:
        records = [r for b in reader.batches(limit=50, idle_timeout_s=10) for r in b]
    sent = [json.loads(r.value)["event_id"] for r in records]
    assert sent == test.column("event_id").to_pylist()[:50]
    code, out, _ = run_cli(capsys, "produce", "--data", str(cj_small), "--topic", "p-test",
                           "--bootstrap-servers", kafka_broker, "--split", "test",
                           "--skip", "50", "--limit", "30", "--partitions", "1")
    assert code == 0 and "sent 30 events" in out  # the next 30: a stream sent in two parts
    with TopicReader(kafka_broker, "p-test") as reader:
        records = [r for b in reader.batches(limit=80, idle_timeout_s=10) for r in b]
    sent = [json.loads(r.value)["event_id"] for r in records]
    assert sent == test.column("event_id").to_pylist()[:80]


@pytest.mark.kafka
def test_broker_command_runs_until_sigterm():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "broker", "--port",
                                str(port)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "memory-only" in process.stdout.readline()
        assert accepts_connections("127.0.0.1", port)
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert not accepts_connections("127.0.0.1", port)
    finally:
        if process.poll() is None:
            process.kill()
