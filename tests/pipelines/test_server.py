"""``dynllm serve``: recommendations, errors and metrics over real HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.outputs import load_store
from pipelines.server import BadRequest, Recommender, make_server, parse_recommend_query


@pytest.fixture(scope="module")
def server_url(run_dir, one_shard_state):
    server = make_server(Recommender(run_dir, one_shard_state), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            status, body, kind = response.status, response.read(), response.headers[
                "Content-Type"]
    except urllib.error.HTTPError as err:
        status, body, kind = err.code, err.read(), err.headers["Content-Type"]
    return status, json.loads(body) if kind == "application/json" else body.decode()


def test_recommend_returns_top_k_with_item_text(server_url, one_shard_state):
    user = str(load_store(one_shard_state / "embeddings-shard-0-of-1.npz")[0][0])
    status, body = _get(f"{server_url}/recommend?user={user}&k=7")
    assert status == 200 and body["user_id"] == user
    scores = [item["score"] for item in body["items"]]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    assert all(item["title"] and item["category"] for item in body["items"])
    assert body["facet_weights"] is None  # a plain TGN run has no profile facets
    assert body["version"] >= 1


@pytest.mark.parametrize("query, status", [
    ("user=nobody-like-this&k=5", 404),
    ("k=5", 400),
    ("user=1&k=0", 400),
    ("user=1&k=abc", 400),
    ("user=1&k=100000", 400),
    ("user=1&k=2&k=3", 400),
])
def test_bad_requests_get_json_errors_not_500(server_url, query, status):
    code, body = _get(f"{server_url}/recommend?{query}")
    assert code == status and "error" in body


def test_health_and_metrics(server_url):
    status, body = _get(f"{server_url}/healthz")
    assert status == 200 and body["status"] == "ok" and body["users"] > 0
    _get(f"{server_url}/recommend?user=x&k=1")
    status, text = _get(f"{server_url}/metrics")
    assert status == 200
    assert 'dynllm_http_requests_total{code="404",handler="/recommend"}' in text
    assert "dynllm_embedding_store_users" in text
    assert _get(f"{server_url}/nope")[0] == 404


def test_parse_recommend_query_defaults_k():
    assert parse_recommend_query("user=u1") == ("u1", 10)
    with pytest.raises(BadRequest):
        parse_recommend_query("user=&k=1")


def test_recommend_serves_the_models_full_score(run_dir, one_shard_state):
    """Served scores are the shard model's history mixture over the stored dot products."""
    recommender = Recommender(run_dir, one_shard_state)
    user = str(load_store(one_shard_state / "embeddings-shard-0-of-1.npz")[0][0])
    model, t = recommender.shards[0].model, recommender.shards[0].t
    index = torch.from_numpy(model.users.encode([user], grow=False))
    own = torch.tensor(sorted(model.repeat.signals.slots_of[int(index[0])]))
    with torch.no_grad():  # P(repeat) ≈ 1: the user's own items come first
        model.repeat.gate[-1].bias.fill_(50.0)
    after = recommender.recommend(user, len(own))
    served = {item["item_id"] for item in after["items"]}
    assert served == set(model.items.decode(own.tolist()))
    # the served scores, recomputed here from the stored embedding at the shard's time
    vectors = recommender.shards[0].item_vectors
    embedding = torch.from_numpy(load_store(one_shard_state / "embeddings-shard-0-of-1.npz")[3][0])
    with torch.no_grad():
        full = model.mix_history((vectors @ embedding).unsqueeze(0), index,
                                 torch.tensor([t], dtype=torch.float64))[0]
    top = model.items.encode([after["items"][0]["item_id"]], grow=False)[0]
    assert abs(after["items"][0]["score"] - float(full.max())) < 1e-3
    assert abs(float(full[top]) - float(full.max())) < 1e-3  # the best item (or a tie of it)


def test_a_batch_of_requests_gets_each_requests_own_answer(run_dir, one_shard_state):
    """The server scores concurrent requests in one batch: the same answers as one by one."""
    recommender = Recommender(run_dir, one_shard_state)
    users = [str(u) for u in load_store(one_shard_state / "embeddings-shard-0-of-1.npz")[0][:6]]
    requests = [(users[0], 5), ("nobody", 3), *((u, 1 + i) for i, u in enumerate(users[1:]))]
    batch = recommender.recommend_many(requests)
    assert batch[1] is None
    for (user, k), answer in zip(requests, batch, strict=True):
        if answer is not None:
            alone = recommender.recommend(user, k)
            assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in alone["items"]]
            assert [i["score"] for i in answer["items"]] == [i["score"] for i in alone["items"]]
            assert len(answer["items"]) == k and answer["user_id"] == user


def test_pinned_pair_index_gives_the_reference_knn_terms(run_dir, one_shard_state):
    """The pinned pair index gives ``PurchaseSignals.neighbor_scores`` and ``item_scores``
    (≤ 1e-6); the user-KNN term also for a user whose purchases came after the pin (his row
    as it is now; the item-KNN buyer sets lag until the next refresh)."""
    from pipelines.serving import ServedSignals
    from tgn.signals import PurchaseSignals

    recommender = Recommender(run_dir, one_shard_state)
    shard = recommender.shards[0]
    served, num_items = shard.signals, len(shard.item_ids)
    assert isinstance(served, ServedSignals) and served.pinned is not None
    assert served.pinned.generation == served.generation  # built for these statistics
    reference = PurchaseSignals()
    reference.load_packed(served.packed())
    users = torch.tensor(sorted(served.slots_of)[:25] + [10**6])  # + one without history

    def same(queries: torch.Tensor, ks: tuple[int, ...], items: bool = True) -> None:
        for k in ks:
            np.testing.assert_allclose(
                served.neighbor_scores(queries, shard.t, num_items, k).numpy(),
                reference.neighbor_scores(queries, shard.t, num_items, k).numpy(),
                rtol=1e-6, atol=1e-7)
        if items:
            np.testing.assert_allclose(served.item_scores(queries, num_items).numpy(),
                                       reference.item_scores(queries, num_items).numpy(),
                                       rtol=1e-6, atol=1e-7)

    same(users, (5, 300))
    pinned, user = served.pinned, users[:1]
    for signals in (served, reference):  # two new items for one user, after the pin
        signals.update(user.repeat(2), torch.tensor([0, 1]), torch.full((2,), shard.t + 1.0))
    assert served.pair_index() is pinned and pinned.generation != served.generation
    same(user, (300,), items=False)


def _signals_by_pair(signals) -> dict[tuple[int, int], tuple[float, ...]]:
    n = signals.size
    return {(u, i): (c, last, *d) for u, i, c, last, d in zip(
        signals.pair_user[:n].tolist(), signals.pair_item[:n].tolist(),
        signals.count[:n].tolist(), signals.last[:n].tolist(), signals.decayed[:n].tolist(),
        strict=True)}


def _assert_same_statistics(served, model, t: float, num_items: int) -> None:
    """Same pairs, user and item statistics (up to float rounding) as ``model``'s."""
    signals = model.repeat.signals
    ours, theirs = _signals_by_pair(served), _signals_by_pair(signals)
    assert ours.keys() == theirs.keys()
    np.testing.assert_allclose(np.array([ours[key] for key in theirs]),
                               np.array(list(theirs.values())), rtol=1e-9)
    users = signals.user_stats.size(0)
    np.testing.assert_allclose(served.user_stats[:users].numpy(), signals.user_stats.numpy())
    np.testing.assert_allclose(served.item_features(t, num_items).numpy(),
                               signals.item_features(t, num_items).numpy(), rtol=1e-5)


@pytest.mark.kafka
def test_served_state_follows_the_changelog(kafka_broker, run_dir, cj_small, tmp_path):
    """Live: the server's statistics, replayed from ``user-embeddings``, are the pipeline's; a
    new purchase reaches ``/recommend`` (its version and its history) within seconds; and a
    server restarted on the checkpoint does not count the changelog's events twice."""
    import time

    from pipelines.pipeline import PipelineConfig, run_pipeline
    from pipelines.sources import StopFlag
    from streaming.kafka_io import create_topics, json_producer
    from streaming.producer import event_messages
    from tgn.model import TGNRecommender

    events = pq.read_table(cj_small / "events.parquet").slice(0, 900)
    create_topics(kafka_broker, ["purchases"], partitions=2)
    producer = json_producer(kafka_broker)
    for _key, value, _ts in event_messages(events.slice(0, 800)):
        producer.send("purchases", value=value)
    producer.flush()
    stop = StopFlag()
    config = PipelineConfig(run_dir=str(run_dir), state_dir=str(tmp_path),
                            bootstrap_servers=kafka_broker, max_batch=200,
                            request_profiles=False, checkpoint_events=10**9,
                            checkpoint_seconds=3600.0)
    pipeline = threading.Thread(target=run_pipeline, args=(config, stop), daemon=True)
    pipeline.start()
    recommender = Recommender(run_dir, tmp_path, bootstrap_servers=kafka_broker).start()
    try:
        deadline = time.monotonic() + 120
        while recommender.changelog["events_applied"] < 800:
            assert time.monotonic() < deadline, recommender.changelog
            time.sleep(0.1)
        # one more purchase of a known user, of an item new to them
        user = str(events.column("user_id")[0])
        shard = recommender.shards[0]
        index = int(shard.model.users.encode([user], grow=False)[0])
        own = set(shard.model.items.decode(list(shard.signals.slots_of[index])))
        item = next(i for i in events.column("item_id").to_pylist() if i not in own)
        before = recommender.recommend(user, 5)["version"]
        row = {**events.slice(0, 1).to_pylist()[0], "event_id": "fresh-1", "item_id": item,
               "ts": float(events.column("ts")[799]) + 60.0}
        producer.send("purchases", value={k: v for k, v in row.items() if v is not None})
        producer.flush()
        sent = time.monotonic()
        while recommender.recommend(user, 5)["version"] == before:
            assert time.monotonic() - sent < 30, "the new purchase never reached the server"
            time.sleep(0.01)
        answer = recommender.recommend(user, 5)
        assert answer["version"] == before + 1 and answer["scored_at"] == row["ts"]
        assert item in shard.model.items.decode(list(shard.signals.slots_of[index]))
    finally:
        stop.set()
        pipeline.join(60)
        recommender.close()
    producer.close()
    model = TGNRecommender.load(tmp_path / "shard-0-of-1.pt")  # saved at the stop
    num_items = len(shard.item_ids)
    _assert_same_statistics(shard.signals, model, shard.t, num_items)
    # a server started on that checkpoint reads the whole changelog again: nothing twice
    again = Recommender(run_dir, tmp_path, bootstrap_servers=kafka_broker).start()
    try:
        deadline = time.monotonic() + 60
        while again.changelog["records"] < recommender.changelog["records"]:
            assert time.monotonic() < deadline, again.changelog
            time.sleep(0.1)
        assert again.changelog["events_applied"] == 0
        _assert_same_statistics(again.shards[0].signals, model, shard.t, num_items)
        assert again.recommend(user, 5)["version"] == before + 1
    finally:
        again.close()
