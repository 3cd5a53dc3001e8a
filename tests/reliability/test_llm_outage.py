"""The LLM endpoint fails, then hangs, then recovers, under a running ``dynllm worker``.

A real HTTP server in this test speaks OpenAI chat completions and answers the four facet lines;
the worker (a subprocess, real broker, real embedder) calls it with a 1 s timeout. While the
endpoint answers 500s and then sleeps past the timeout, the worker must retry with backoff,
count the errors and timeouts, stay alive, lose no request, and the pipeline's side (the profile
store and ``LiveProfiles``, fed from ``profile-updates``) must keep the last good profile. Once
the endpoint recovers, the waiting profiles are written.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pipelines.profiles_io import LiveProfiles
from profiles.graph import PurchaseGraph
from profiles.store import ProfileStore
from profiles.worker import REQUESTS_TOPIC, UPDATES_TOPIC
from streaming.broker import free_port
from streaming.dataset import Dataset
from streaming.kafka_io import create_topics, json_producer

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

TIMEOUT_S = 1.0  # the worker's --llm-timeout; a hanging endpoint sleeps 3x as long


class FlakyLLM:
    """Chat-completions endpoint on loopback whose ``mode`` is ``ok``, ``fail`` or ``hang``.

    Attributes:
        calls: Requests received per mode.
        generation: Written into the answer, so profiles of different phases differ.
    """

    def __init__(self) -> None:
        self.mode, self.generation = "ok", 1
        self.calls = {"ok": 0, "fail": 0, "hang": 0}
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                self.rfile.read(int(self.headers["Content-Length"]))
                mode = llm.mode
                llm.calls[mode] += 1
                if mode == "hang":
                    time.sleep(3 * TIMEOUT_S)
                status = 500 if mode == "fail" else 200
                text = (f"Crowd segment: budget family shopper\nPersonal interests: cooking "
                        f"phase {llm.generation}\nPreferred categories: Cheese\n"
                        f"Favored brands: Private label")
                body = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": text}}],
                                   "usage": {"completion_tokens": 20}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _sample(port: int, name: str, labels: str = "") -> float:
    """One sample ``name{labels}`` from ``/metrics`` (0 if absent)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _request(bootstrap: str, user: str, ts: float) -> None:
    producer = json_producer(bootstrap)
    producer.send(REQUESTS_TOPIC, key=user, value={"user_id": user, "ts": ts})
    producer.flush()
    producer.close()


class _Updates:
    """``profile-updates`` followed into the pipeline's own :class:`LiveProfiles`."""

    def __init__(self, bootstrap: str) -> None:
        from streaming.kafka_io import TopicReader

        self.reader = TopicReader(bootstrap, UPDATES_TOPIC)
        self.live = LiveProfiles([], np.zeros(0), np.zeros((0, 4, 384), np.float32))
        self.seen: list[tuple[str, float]] = []

    def drain(self) -> None:
        for record in self.reader.poll(0.5):
            message = json.loads(record.value)
            self.live.add(message)
            self.seen.append((message["user_id"], message["ts"]))

    def vectors(self, user: str, t: float) -> np.ndarray | None:
        """The facet vectors ``[F, T]`` fusion would use for ``user`` at event time ``t``."""
        found = self.live.lookup([user], np.array([t]), 4, 384)
        return found.facets[0].numpy() if bool(found.has_profile[0]) else None

    def row(self, user: str, t: float) -> int:
        """The profile version (table row) fusion would use; -1 for none."""
        return int(self.live.lookup([user], np.array([t]), 4, 384).row[0])


def test_llm_fails_then_hangs_then_recovers(kafka_broker, cj_small: Path, tmp_path, tools):
    graph = PurchaseGraph(Dataset.load(cj_small))
    # shoppers with baskets at 3+ times, so a later request has a new history (no cache hit)
    u1, u2 = [u for u in graph.users if len(np.unique(graph.user_event_times(u))) >= 3][:2]
    t1, t1_late = (float(x) for x in np.unique(graph.user_event_times(u1))[[1, -1]])
    t2 = float(graph.user_event_times(u2)[-1])
    create_topics(kafka_broker, [REQUESTS_TOPIC, UPDATES_TOPIC])
    llm, port, store = FlakyLLM(), free_port(), ProfileStore(tmp_path / "p.sqlite")
    worker = tools.start_dynllm(
        ["worker", "--bootstrap-servers", kafka_broker, "--data", str(cj_small), "--store",
         str(tmp_path / "p.sqlite"), "--llm-url", llm.url, "--llm-timeout", str(TIMEOUT_S),
         "--min-new-events", "1", "--batch-size", "2", "--threads", "1", "--metrics-port",
         str(port)], log=tmp_path / "worker.log")
    updates = _Updates(kafka_broker)
    try:
        _request(kafka_broker, u1, t1)  # a good profile first
        tools.wait_until(lambda: store.latest(u1) is not None, 120, "the first profile", worker)
        tools.wait_until(lambda: updates.drain() or updates.seen, 30, "its update")
        good = updates.vectors(u1, t1_late + 1)
        assert good is not None

        llm.mode, llm.generation = "fail", 2
        _request(kafka_broker, u1, t1_late)  # u1 has bought more: a new profile is due
        _request(kafka_broker, u2, t2)
        tools.wait_until(lambda: _sample(port, "dynllm_profile_batch_retries_total") >= 1, 60,
                         "a batch failing on 500s", worker)
        assert _sample(port, "dynllm_llm_errors_total", 'kind="http_5xx"') >= 4  # 1 + 3 retries
        llm.mode = "hang"
        tools.wait_until(lambda: _sample(port, "dynllm_llm_errors_total",
                                         'kind="timeout"') >= 4, 60, "timeouts", worker)
        tools.wait_until(lambda: _sample(port, "dynllm_profile_batch_retries_total") >= 2, 30,
                         "the hanging batch given back to the queue", worker)
        # during the outage: the last good profile is what the store and fusion have
        updates.drain()
        assert store.latest(u1).ts == t1 and store.latest(u2) is None
        np.testing.assert_array_equal(updates.vectors(u1, t1_late + 1), good)
        assert updates.vectors(u2, t2 + 1) is None
        # not lost: queued (the worker reads no more while its queue waits) and unacknowledged
        assert _sample(port, "dynllm_profile_queue_length") >= 1
        assert sum(store.offsets(REQUESTS_TOPIC).values()) == 1
        assert _sample(port, "dynllm_llm_retries_total") >= 6

        llm.mode = "ok"
        tools.wait_until(lambda: (store.latest(u1).ts == t1_late
                                  and store.latest(u2) is not None), 60, "recovery", worker)
        tools.wait_until(lambda: updates.drain() or len(updates.seen) >= 3, 30, "the updates")
        assert sorted(updates.seen) == sorted([(u1, t1), (u1, t1_late), (u2, t2)])
        # fusion now picks u1's new version for later events, the old one for earlier events
        assert updates.row(u1, t1_late + 1) == updates.row(u1, t1 + 1) + 1
        assert updates.vectors(u2, t2 + 1) is not None
        assert [store.latest(u).facets.texts[1] for u in (u1, u2)] == ["cooking phase 2"] * 2
        assert not np.array_equal(updates.vectors(u1, t1_late + 1), good)
    finally:
        worker.terminate()
        assert worker.wait(60) == 0, (tmp_path / "worker.log").read_text()[-3000:]
        updates.reader.close()
        llm.server.shutdown()
    assert sum(store.offsets(REQUESTS_TOPIC).values()) == 3  # every request acknowledged
    log = (tmp_path / "worker.log").read_text()
    assert "LLM backend failed" in log and "queued users kept" in log
    assert llm.calls["fail"] >= 4 and llm.calls["hang"] >= 4
