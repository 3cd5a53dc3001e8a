"""``dynllm serve``: top-K recommendations over HTTP from the pipeline's state.

Routes (JSON unless noted):

* ``GET /recommend?user=ID&k=10`` — the user's top-K items with scores and item text, and the
  user's facet weights. Unknown user: 404; missing or bad ``k``/``user``: 400.
* ``GET /healthz`` — ``{"status": "ok", "users": …, "shards": …, "checkpoint_age_s": …}``.
* ``GET /metrics`` — Prometheus text exposition.

Other methods (``POST``, ``PUT``, ``DELETE``, ``PATCH``, ``OPTIONS``, ``HEAD``) get 405 with
``Allow: GET``; a method http.server does not know gets its 501 (RFC 9110 §15.6.2). Any error a
request should never cause is logged with its traceback and answered with a JSON 500.

A user's embedding comes from the embedding store of the user's shard and is scored against the
item embeddings of that same shard's model (the state the embedding was computed with), so a
multi-shard pipeline serves consistent scores. The stored embeddings are only the dot-product
part of the score: when the model has the repeat term (``TGNConfig.repeat``), the shard model's
term for the user's own purchase history, at the shard's latest event time, is added, so what is
served is the full score that ``dynllm evaluate`` measures. State files are re-read when they
change.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.outputs import load_store, store_path
from pipelines.state import checkpoint_path, load_run_model
from streaming import metrics
from streaming.errors import UsageError
from tgn.fusion import FACETS
from tgn.model import TGNRecommender

log = logging.getLogger(__name__)

#: Largest ``k`` a request may ask for.
MAX_K = 1000
#: Seconds between checks for newer state files.
RELOAD_EVERY_S = 2.0


class BadRequest(Exception):
    """A request the client must fix; carries the HTTP status."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Recommender:
    """Scores items for users from the pipeline's shard checkpoints and embedding stores.

    Args:
        run_dir: trained run (``model.pt``, ``config.json`` naming the dataset).
        state_dir: the pipeline's ``--state-dir``.
        data_dir: dataset for item text (default: the one in the run's ``config.json``).
    """

    def __init__(self, run_dir: str | Path, state_dir: str | Path,
                 data_dir: str | Path | None = None) -> None:
        self.run_dir, self.state_dir = Path(run_dir), Path(state_dir)
        self.items = self._item_text(data_dir)
        self.num_shards = self._shard_count()
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._checked = 0.0
        self.users: dict[str, tuple[int, int]] = {}  # user → (shard, row)
        self._stores: list[tuple[np.ndarray, ...]] = []
        self._item_ids: list[list[str]] = []
        self._item_vectors: list[torch.Tensor] = []
        self._models: list[tuple[TGNRecommender, float]] = []  # per shard: model, its time
        self.checkpoint_time = 0.0
        self.reload()

    def _item_text(self, data_dir: str | Path | None) -> dict[str, dict[str, object]]:
        if data_dir is None:
            config = self.run_dir / "config.json"
            data_dir = json.loads(config.read_text()).get("data") if config.exists() else None
        if data_dir is None or not (Path(data_dir) / "items.parquet").exists():
            raise UsageError("no item catalog: pass --data DIR (a dataset directory)")
        rows = pq.read_table(Path(data_dir) / "items.parquet").to_pylist()
        return {r["item_id"]: {k: r[k] for k in ("title", "category", "brand")} for r in rows}

    def _shard_count(self) -> int:
        counts = {int(p.stem.rsplit("-of-", 1)[1]) for p in self.state_dir.glob("shard-*-of-*.pt")}
        if len(counts) > 1:
            raise UsageError(f"{self.state_dir} mixes shard counts {sorted(counts)}")
        return counts.pop() if counts else 1

    def _files(self) -> list[Path]:
        n = self.num_shards
        return [f(self.state_dir, s, n) for s in range(n) for f in (checkpoint_path, store_path)]

    def reload(self) -> None:
        """Re-read state files whose modification times changed (cheap when none did)."""
        files = self._files()
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in files)
        if stamp == self._stamp:
            return
        base = load_run_model(self.run_dir)
        stores, item_ids, item_vectors, models, users, newest = [], [], [], [], {}, 0.0
        for shard in range(self.num_shards):
            ckpt = checkpoint_path(self.state_dir, shard, self.num_shards)
            store = store_path(self.state_dir, shard, self.num_shards)
            if not (ckpt.exists() and store.exists()):
                continue
            model = TGNRecommender.load(ckpt, user_head=base.user_head).eval()
            newest = max(newest, model.checkpoint_extra.get("saved_at", 0.0))
            with torch.no_grad():
                t = float(model.memory.last_update.max()) if model.num_nodes else 0.0
                item_vectors.append(model.item_embeddings(t))
            models.append((model, t))
            item_ids.append(model.items.to_list())
            stores.append(load_store(store))
            users.update({str(u): (len(stores) - 1, row) for row, u in enumerate(stores[-1][0])})
        with self._lock:
            self._stores, self._item_ids, self._item_vectors = stores, item_ids, item_vectors
            self._models = models
            self.users, self._stamp, self.checkpoint_time = users, stamp, newest
        metrics.EMBEDDING_STORE_USERS.set(len(users))
        metrics.CHECKPOINT_TIMESTAMP.set(newest)
        log.info("loaded %d users from %d shard(s)", len(users), len(stores))

    def maybe_reload(self) -> None:
        """:meth:`reload` at most every :data:`RELOAD_EVERY_S` seconds."""
        if time.monotonic() - self._checked >= RELOAD_EVERY_S:
            self._checked = time.monotonic()
            self.reload()

    def recommend(self, user: str, k: int) -> dict[str, object]:
        """The top-``k`` items for ``user``; :class:`KeyError` if the user has no embedding."""
        with self._lock:
            shard, row = self.users[user]
            user_ids, ts, version, embedding, weights = self._stores[shard]
            vectors, item_ids = self._item_vectors[shard], self._item_ids[shard]
            model, t = self._models[shard]
        scores = vectors @ torch.from_numpy(embedding[row])  # [N] dot-product part
        if user in model.users:  # mixed with the user's own history (if any)
            index = torch.from_numpy(model.users.encode([user], grow=False))
            with torch.no_grad():
                scores = model.mix_history(scores.unsqueeze(0), index,
                                           torch.tensor([t], dtype=torch.float64))[0]
        top = torch.topk(scores, min(k, scores.numel()))
        facet = weights[row] if weights.shape[1] else None
        return {
            "user_id": user, "ts": float(ts[row]), "version": int(version[row]),
            "facet_weights": None if facet is None or np.isnan(facet).all()
            else dict(zip(FACETS, np.round(facet, 4).tolist(), strict=True)),
            "items": [{"item_id": item_ids[i], "score": round(float(s), 4),
                       **self.items.get(item_ids[i], {})}
                      for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)],
        }


def parse_recommend_query(query: str) -> tuple[str, int]:
    """``(user, k)`` from a query string, or :class:`BadRequest` (400).

    >>> parse_recommend_query("user=42&k=5")
    ('42', 5)
    """
    params = parse_qs(query, keep_blank_values=True)
    users = params.get("user", [])
    if len(users) != 1 or not users[0]:
        raise BadRequest(HTTPStatus.BAD_REQUEST, "give exactly one non-empty user=ID")
    k_text = params.get("k", ["10"])
    try:
        k = int(k_text[0]) if len(k_text) == 1 else 0
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"k must be an integer in [1, {MAX_K}]")
    return users[0], k


class _Handler(BaseHTTPRequestHandler):
    recommender: Recommender  # set on the subclass made by make_server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib name)
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, route: str,
              started: float, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        metrics.HTTP_REQUESTS.labels(route, str(int(status))).inc()
        metrics.HTTP_REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)

    def _json(self, status: HTTPStatus, payload: object, route: str, started: float) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", route, started)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        started = time.perf_counter()
        url = urlsplit(self.path)
        route = url.path if url.path in ("/recommend", "/healthz", "/metrics") else "other"
        try:
            if route == "/metrics":
                body, content_type = metrics.exposition()
                self._send(HTTPStatus.OK, body, content_type, route, started)
            elif route == "/healthz":
                self._json(HTTPStatus.OK, self._health(), route, started)
            elif route == "/recommend":
                self._json(HTTPStatus.OK, self._recommend(url.query), route, started)
            else:
                raise BadRequest(HTTPStatus.NOT_FOUND, f"no route {url.path}")
        except BadRequest as exc:
            self._json(exc.status, {"error": str(exc)}, route, started)
        except Exception:  # a bug, never the client's fault: log it, answer 500, keep serving
            log.exception("unexpected error answering GET %r", self.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"}, route,
                       started)

    def _not_allowed(self) -> None:
        """405 with ``Allow: GET`` and a JSON error (headers only for ``HEAD``)."""
        body = json.dumps({"error": f"method {self.command} not allowed; use GET"}).encode()
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, body, "application/json", "other",
                   time.perf_counter(), {"Allow": "GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815

    def _health(self) -> dict[str, object]:
        rec = self.recommender
        age = time.time() - rec.checkpoint_time if rec.checkpoint_time else None
        return {"status": "ok", "users": len(rec.users), "shards": rec.num_shards,
                "checkpoint_age_s": age}

    def _recommend(self, query: str) -> dict[str, object]:
        user, k = parse_recommend_query(query)
        self.recommender.maybe_reload()
        try:
            return self.recommender.recommend(user, k)
        except KeyError:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"unknown user {user!r}") from None


def make_server(recommender: Recommender, host: str = "127.0.0.1",
                port: int = metrics.SERVER_PORT) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering from ``recommender``; port 0 picks one."""
    handler = type("Handler", (_Handler,), {"recommender": recommender})
    return ThreadingHTTPServer((host, port), handler)


__all__ = ["BadRequest", "Recommender", "make_server", "parse_recommend_query"]
