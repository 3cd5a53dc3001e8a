"""The async worker against a real Tansu broker: trigger policy, dedupe, kill and restart, and
prompts from purchases that arrive live on the purchases topic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client import REGISTRY

from profiles.backends import HttpBackend
from profiles.follow import PURCHASES_TOPIC
from profiles.graph import PurchaseGraph
from profiles.store import ProfileStore
from profiles.worker import (
    REQUESTS_TOPIC,
    UPDATES_TOPIC,
    ProfileWorker,
    Request,
    TriggerPolicy,
)
from profiles.writer import ProfileWriter
from streaming.dataset import Dataset
from streaming.kafka_io import TopicReader, create_topics, json_producer

DAY = 86400.0


def _produce(bootstrap: str, messages: list) -> None:
    create_topics(bootstrap, [REQUESTS_TOPIC, UPDATES_TOPIC])
    producer = json_producer(bootstrap)
    for m in messages:
        producer.send(REQUESTS_TOPIC, key=m.get("user_id", "?") if isinstance(m, dict) else None,
                      value=m)
    producer.flush()
    producer.close()


def _purchases(bootstrap: str, values: list) -> None:
    create_topics(bootstrap, [PURCHASES_TOPIC])
    producer = json_producer(bootstrap)
    for v in values:
        producer.send(PURCHASES_TOPIC, key=v.get("user_id") if isinstance(v, dict) else None,
                      value=v)
    producer.flush()
    producer.close()


def _buy(event_id: str, user: str, item: str, day: float) -> dict:
    return {"event_id": event_id, "user_id": user, "item_id": item, "ts": day * DAY,
            "quantity": 1.0, "price": 1.0}


def _graph_events(outcome: str) -> float:
    return REGISTRY.get_sample_value("dynllm_profile_graph_events_total",
                                     {"outcome": outcome}) or 0.0


def _updates(bootstrap: str) -> list[dict]:
    with TopicReader(bootstrap, UPDATES_TOPIC) as reader:
        return [json.loads(r.value) for b in reader.batches(idle_timeout_s=2.0) for r in b]


def test_trigger_policy_counts_new_purchases_and_age(tmp_path):
    store = ProfileStore(tmp_path / "p.sqlite")
    policy = TriggerPolicy(min_new_events=3, max_age_s=10 * DAY)
    assert policy.observe(Request("u", 1 * DAY), store)  # no profile yet: due
    policy.done("u", 1 * DAY)
    assert not policy.observe(Request("u", 2 * DAY), store)
    assert policy.observe(Request("u", 3 * DAY, new_events=2), store)  # 3 new lines
    policy.done("u", 3 * DAY)
    assert policy.observe(Request("u", 13 * DAY), store)  # profile 10 days old
    policy.done("u", 13 * DAY)
    assert not policy.observe(Request("u", 12 * DAY, new_events=9), store)  # stale request


@pytest.mark.kafka
def test_worker_serves_dedupes_and_counts(kafka_broker, tiny_data, chat_peer, embedder,
                                          tmp_path):
    _produce(kafka_broker, [{"user_id": "u1", "ts": 6 * DAY}, {"user_id": "u1", "ts": 10 * DAY},
                            {"user_id": "u2", "ts": 11 * DAY}, {"user_id": "nobody", "ts": 1.0},
                            {"ts": 3}])
    before = REGISTRY.get_sample_value("dynllm_profiles_failed_total",
                                       {"reason": "bad_request"}) or 0.0
    store = ProfileStore(tmp_path / "p.sqlite")
    writer = ProfileWriter(HttpBackend(chat_peer.url), embedder, store)
    worker = ProfileWorker(kafka_broker, PurchaseGraph(Dataset.load(tiny_data)), writer,
                           TriggerPolicy(min_new_events=1), max_queue=8)
    worker.run(idle_exit_s=1.0)
    updates = _updates(kafka_broker)
    # u1's two requests were read in one poll: one profile, from the newer request
    assert sorted((u["user_id"], u["ts"]) for u in updates) == [("u1", 10 * DAY),
                                                                ("u2", 11 * DAY)]
    assert len(updates[0]["vectors"]) == 4 and len(updates[0]["vectors"][0]) == 384
    assert store.offsets(REQUESTS_TOPIC) and sum(store.offsets(REQUESTS_TOPIC).values()) == 5
    after = REGISTRY.get_sample_value("dynllm_profiles_failed_total", {"reason": "bad_request"})
    assert after == before + 1


@pytest.mark.kafka
@pytest.mark.slow
def test_killed_worker_loses_no_request(kafka_broker, cj_small, tiny_llm, tmp_path):
    graph = PurchaseGraph(Dataset.load(cj_small))
    users = graph.users[:12]
    requests = [{"user_id": u, "ts": float(graph.user_event_times(u)[-1])} for u in users]
    _produce(kafka_broker, requests)
    store_path = tmp_path / "p.sqlite"
    command = [sys.executable, "-m", "pipelines.cli", "worker", "--bootstrap-servers",
               kafka_broker, "--data", str(cj_small), "--store", str(store_path),
               "--llm-model", str(tiny_llm), "--min-new-events", "1", "--batch-size", "2",
               "--max-queue", "4", "--threads", "1", "--metrics-port", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    store = ProfileStore(store_path)
    deadline = time.monotonic() + 240
    while len(store) < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # mid-run: some users done, the rest not
    first.wait()
    done_at_kill = len(store)
    assert 2 <= done_at_kill < len(users)
    second = subprocess.run([*command, "--idle-exit", "2"], env=env, timeout=300,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    stored = {u: store.latest(u) for u in users}
    assert all(p is not None and p.ts == r["ts"] for (u, p), r in zip(stored.items(), requests,
                                                                       strict=True))
    assert len(store) == len(users)  # repeats after the restart hit the store's unique key
    published = {u["user_id"] for u in _updates(kafka_broker)}
    assert published == set(users)
    assert sum(store.offsets(REQUESTS_TOPIC).values()) == len(users)


@pytest.mark.kafka
def test_sigterm_mid_batch_stops_at_once_and_loses_nothing(kafka_broker, tiny_data, chat_peer,
                                                           tmp_path):
    _produce(kafka_broker, [{"user_id": "u1", "ts": 10 * DAY}, {"user_id": "u2", "ts": 11 * DAY}])
    chat_peer.delay = 60.0  # a generation that would take a minute
    store_path = tmp_path / "p.sqlite"
    command = [sys.executable, "-m", "pipelines.cli", "worker", "--bootstrap-servers",
               kafka_broker, "--data", str(tiny_data), "--store", str(store_path),
               "--llm-url", chat_peer.url, "--llm-timeout", "120", "--metrics-port", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not chat_peer.requests and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert chat_peer.requests, "the worker never asked the model"
    stopped_at = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0, first.stderr.read()[-2000:]
    assert time.monotonic() - stopped_at < 10  # not after the minute-long answer
    store = ProfileStore(store_path)
    assert len(store) == 0 and sum(store.offsets(REQUESTS_TOPIC).values()) == 0  # nothing acked
    chat_peer.delay = 0.0
    second = subprocess.run([*command, "--idle-exit", "2"], env=env, timeout=120,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert {u["user_id"] for u in _updates(kafka_broker)} == {"u1", "u2"}
    assert sum(store.offsets(REQUESTS_TOPIC).values()) == 2


@pytest.mark.kafka
def test_live_purchases_reach_the_next_prompt(kafka_broker, tiny_data, chat_peer, embedder,
                                              tmp_path):
    """u4 bought only bread (seed, days 9 and 13); cheese bought live on day 20 must be in its
    next prompt, with the co-buyers cheese brings (u1, u2); then soda on day 21 in the one after,
    read by a restarted worker (which re-reads the topic from its beginning)."""
    outcomes = ("added", "in_seed", "duplicate_event_id", "unknown_item", "bad_json")
    before = {o: _graph_events(o) for o in outcomes}
    store = ProfileStore(tmp_path / "p.sqlite")
    writer = ProfileWriter(HttpBackend(chat_peer.url), embedder, store)
    data = Dataset.load(tiny_data)

    def run_worker() -> str:
        """One worker run until idle; the user message of the last prompt it sent."""
        worker = ProfileWorker(kafka_broker, PurchaseGraph(data), writer,
                               TriggerPolicy(min_new_events=1))
        worker.run(idle_exit_s=1.0)
        return chat_peer.requests[-1]["messages"][-1]["content"]

    live = _buy("live-1", "u4", "i1", 20)  # cheese
    _purchases(kafka_broker, [live, live, _buy("old", "u4", "i4", 3),  # a repeat; seed time
                              _buy("x", "u4", "no-such-item", 20), b"{not json"])
    _produce(kafka_broker, [{"user_id": "u4", "ts": 20 * DAY}])
    prompt = run_worker()
    assert "Categories: Bread, Cheese" in prompt and "3 lines" in prompt
    assert "2 co-buyers also buy" in prompt  # u1 and u2 bought cheese; bread alone had none
    assert store.latest("u4").ts == 20 * DAY
    assert {o: _graph_events(o) - before[o] for o in outcomes} == {
        "added": 1, "in_seed": 1, "duplicate_event_id": 1, "unknown_item": 1, "bad_json": 1}

    _purchases(kafka_broker, [_buy("live-2", "u4", "i3", 21)])  # soda
    _produce(kafka_broker, [{"user_id": "u4", "ts": 21 * DAY}])
    prompt = run_worker()
    assert "Soft Drinks" in prompt.split("co-buyers")[0] and "4 lines" in prompt
    assert [p["ts"] for p in _updates(kafka_broker)] == [20 * DAY, 21 * DAY]


@pytest.mark.kafka
def test_sigterm_while_the_broker_is_gone_stops_at_once(tiny_data, chat_peer, tmp_path):
    """The broker dies while a batch is generated; publishing its updates then waits for it,
    and SIGTERM must still stop the worker promptly (the requests stay unacknowledged)."""
    from streaming.broker import Broker

    broker = Broker().start()
    _produce(broker.bootstrap_servers, [{"user_id": "u1", "ts": 10 * DAY}])
    chat_peer.delay = 8.0
    store_path = tmp_path / "p.sqlite"
    command = [sys.executable, "-m", "pipelines.cli", "worker", "--bootstrap-servers",
               broker.bootstrap_servers, "--data", str(tiny_data), "--store", str(store_path),
               "--llm-url", chat_peer.url, "--metrics-port", "0"]
    worker = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not chat_peer.requests and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.05)
        assert chat_peer.requests, "the worker never asked the model"
        broker.stop()
        assert not broker.running  # gone before the answer comes
        store = ProfileStore(store_path)
        while len(store) == 0 and time.monotonic() < deadline:  # written, now publishing
            time.sleep(0.05)
        time.sleep(1.0)
        stopped_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, worker.stderr.read()[-2000:]
        assert time.monotonic() - stopped_at < 15  # not kafka-python's 120 s delivery timeout
        assert sum(store.offsets(REQUESTS_TOPIC).values()) == 0  # nothing acknowledged
    finally:
        if worker.poll() is None:
            worker.kill()
        broker.stop()
