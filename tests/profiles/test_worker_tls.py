"""The profile worker over real mutual TLS (``tls_kafka``: a real broker only reachable through a
TLS terminator that wants a client certificate): its request reader, purchases follower and
update producer all connect with the settings it is given."""

from __future__ import annotations

import json

import pytest

from profiles.backends import HttpBackend
from profiles.follow import PURCHASES_TOPIC
from profiles.graph import PurchaseGraph
from profiles.store import ProfileStore
from profiles.worker import REQUESTS_TOPIC, UPDATES_TOPIC, ProfileWorker, TriggerPolicy
from profiles.writer import ProfileWriter
from streaming.dataset import Dataset
from streaming.kafka_io import TopicReader, create_topics, json_producer

pytestmark = pytest.mark.kafka

DAY = 86400.0


def test_worker_serves_requests_and_follows_purchases_over_tls(tls_kafka, tiny_data, chat_peer,
                                                              embedder, tmp_path):
    bootstrap, settings = tls_kafka.bootstrap_servers, tls_kafka.settings
    create_topics(bootstrap, [REQUESTS_TOPIC, UPDATES_TOPIC, PURCHASES_TOPIC], settings=settings)
    producer = json_producer(bootstrap, settings)
    producer.send(PURCHASES_TOPIC, key="u2", value={
        "event_id": "tls-1", "user_id": "u2", "item_id": "i1", "ts": 20 * DAY,
        "quantity": 1.0, "price": 1.0})
    for user, day in (("u1", 10), ("u2", 11)):
        producer.send(REQUESTS_TOPIC, key=user, value={"user_id": user, "ts": day * DAY})
    producer.flush()
    producer.close()
    writer = ProfileWriter(HttpBackend(chat_peer.url), embedder,
                           ProfileStore(tmp_path / "p.sqlite"))
    worker = ProfileWorker(bootstrap, PurchaseGraph(Dataset.load(tiny_data)), writer,
                           TriggerPolicy(min_new_events=1), max_queue=8, settings=settings)
    worker.run(idle_exit_s=1.0)
    assert worker.follower.added == 1  # the purchase came through the TLS follower
    with TopicReader(bootstrap, UPDATES_TOPIC, settings=settings) as reader:
        updates = [json.loads(r.value) for b in reader.batches(idle_timeout_s=2.0) for r in b]
    assert sorted(u["user_id"] for u in updates) == ["u1", "u2"]
