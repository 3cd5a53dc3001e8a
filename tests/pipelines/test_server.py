"""``dynllm serve``: recommendations, errors and metrics over real HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

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
