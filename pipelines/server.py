"""``dynllm serve``: top-K recommendations over HTTP (Starlette on uvicorn) from the pipeline's
state, about a second behind it.

Routes (JSON unless noted; the schema is served at ``/openapi.json``, :data:`OPENAPI`):

* ``GET /recommend?user=ID&k=10`` — the user's top-K items with scores and item text, the
  user's ``version`` (events applied) and facet weights, and ``scored_at`` (the event time the
  score refers to). Items the score gives probability 0 (never bought by anyone) are left out,
  so fewer than ``k`` can come back. Unknown user: 404; missing or bad ``k``/``user``: 400.
* ``GET /healthz`` — ``{"status": "ok", "users": …, "shards": …, "checkpoint_age_s": …,
  "changelog": …}``.
* ``GET /metrics`` — Prometheus text exposition.

Other methods get 405 with ``Allow: GET``; unknown routes 404; a request target longer than
:data:`MAX_TARGET_BYTES` 414 and a body over :data:`MAX_BODY_BYTES` 413, all with JSON errors.
Any error a request should never cause is logged with its traceback and answered with a JSON 500.
The bind address is loopback unless ``--host`` says otherwise.

Where the state comes from (:mod:`pipelines.serving`): each shard's checkpoint (model, item
vectors, purchase statistics) and embedding store, re-read when they change; with a broker, the
``user-embeddings`` changelog on top of them (newest embedding per user, the events it applied
replayed into the statistics). A user's score is the dot product of its embedding with its
shard's item vectors, mixed with its purchase history (``TGNRecommender.mix_history``) at the
latest event time the shard has seen: the full score ``dynllm evaluate`` measures.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import threading
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pyarrow.parquet as pq
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from torch import Tensor

from pipelines.outputs import EMBEDDING_TOPIC, load_store, store_path
from pipelines.serving import KNN_REFRESH_S, ServingShard, UserRow, follow
from pipelines.state import checkpoint_path, shard_of
from streaming import metrics
from streaming.errors import UsageError
from streaming.kafka_settings import PLAINTEXT, KafkaSettings
from tgn.fusion import FACETS
from tgn.model import TGNRecommender
from tgn.run import Run

log = logging.getLogger(__name__)

#: Largest ``k`` a request may ask for.
MAX_K = 1000
#: Most ``/recommend`` requests scored in one batch (batches of 8 and 16 cost the same per
#: request on cj26; bigger ones only hold the first answers back).
MAX_BATCH = 16
#: Seconds between checks for newer state files.
RELOAD_EVERY_S = 2.0
#: Longest request target (path and query) answered; longer ones get 414.
MAX_TARGET_BYTES = 16_384
#: Largest request body accepted (the API reads none; bigger ones get 413).
MAX_BODY_BYTES = 1024
#: The routes and the label each gets in the HTTP metrics.
ROUTES = ("/recommend", "/healthz", "/metrics", "/openapi.json")
#: Methods every route answers (GET; the others with 405).
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"]

_ERROR = {"type": "object", "required": ["error"],
          "properties": {"error": {"type": "string"}}}
_ERRORS = {str(code): {"description": text, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/Error"}}}}
    for code, text in ((400, "bad user or k"), (404, "unknown user"), (405, "not GET"),
                       (413, "body too large"), (414, "target too long"))}

#: The OpenAPI 3.0 document of the API (served at ``/openapi.json``; the fuzz test generates
#: requests from it).
OPENAPI: dict[str, object] = {
    "openapi": "3.0.3",
    "info": {"title": "dynllm serve", "version": "1"},
    "paths": {
        "/recommend": {"get": {
            "summary": "top-k items for a user",
            "parameters": [
                {"name": "user", "in": "query", "required": True,
                 "schema": {"type": "string", "minLength": 1}},
                {"name": "k", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}}],
            "responses": {"200": {"description": "recommendations", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Recommendation"}}
            }}, **_ERRORS}}},
        "/healthz": {"get": {"summary": "liveness and state age", "responses": {
            "200": {"description": "ok", "content": {"application/json": {"schema": {
                "type": "object", "required": ["status", "users", "shards"]}}}}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "text exposition", "content": {"text/plain": {
                "schema": {"type": "string"}}}}}}},
    },
    "components": {"schemas": {
        "Error": _ERROR,
        "Recommendation": {
            "type": "object",
            "required": ["user_id", "ts", "version", "scored_at", "facet_weights", "items"],
            "properties": {
                "user_id": {"type": "string"}, "ts": {"type": "number"},
                "version": {"type": "integer"}, "scored_at": {"type": "number"},
                "facet_weights": {"type": "object", "nullable": True,
                                  "additionalProperties": {"type": "number"}},
                "items": {"type": "array", "items": {
                    "type": "object", "required": ["item_id", "score"],
                    "properties": {"item_id": {"type": "string"}, "score": {"type": "number"},
                                   "title": {"type": "string", "nullable": True},
                                   "category": {"type": "string", "nullable": True},
                                   "brand": {"type": "string", "nullable": True}}}}}}}},
}


class BadRequest(Exception):
    """A request the client must fix; carries the HTTP status."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Recommender:
    """Scores items for users from the pipeline's shard checkpoints and embedding stores, and,
    with ``bootstrap_servers``, from the ``user-embeddings`` changelog (:meth:`start`).

    Args:
        run_dir: trained run (``model.pt``, ``config.json`` naming the dataset).
        state_dir: the pipeline's ``--state-dir``.
        data_dir: dataset for item text (default: the one in the run's ``config.json``).
        bootstrap_servers: Kafka ``host:port`` to follow the changelog from (``None``: the
            state files only, fresh to a checkpoint interval).
        topic: the changelog topic.
        kafka_settings: TLS/SASL settings of the changelog reader.

    Attributes:
        users: user id → its newest :class:`~pipelines.serving.UserRow`.
        shards: per shard, its :class:`~pipelines.serving.ServingShard`.
    """

    def __init__(self, run_dir: str | Path, state_dir: str | Path,
                 data_dir: str | Path | None = None, bootstrap_servers: str | None = None,
                 topic: str = EMBEDDING_TOPIC, kafka_settings: KafkaSettings = PLAINTEXT) -> None:
        self.run, self.state_dir = Run.open(run_dir), Path(state_dir)
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.kafka_settings = kafka_settings
        self.items = self._item_text(data_dir)
        self.num_shards = self._shard_count()
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._base: TGNRecommender | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._refreshed = 0.0
        self.users: dict[str, UserRow] = {}
        self.shards: list[ServingShard] = []
        self.checkpoint_time = 0.0
        self.changelog = {"records": 0, "events_applied": 0, "last_record_at": None}
        self.reload()

    def _item_text(self, data_dir: str | Path | None) -> dict[str, dict[str, object]]:
        data_dir = data_dir or self.run.data_dir
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
        """Re-read state files whose modification times changed (cheap when none did).

        The first load (and every load without a changelog) takes each shard's model,
        statistics and stored embeddings; with a changelog, a later checkpoint only brings its
        item vectors and any stored embedding newer than the one served (the changelog keeps
        the statistics).
        """
        files = self._files()
        stamp = tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in files)
        if stamp == self._stamp:
            return
        if self._base is None:  # the run does not change: read once (its head, its model)
            self._base = self.run.model().eval()
        base = self._base
        keep = bool(self.shards) and self.bootstrap_servers is not None
        models, rows, newest = [], {}, 0.0
        for shard in range(self.num_shards):
            ckpt = checkpoint_path(self.state_dir, shard, self.num_shards)
            store = store_path(self.state_dir, shard, self.num_shards)
            if ckpt.exists():  # with a changelog, a later checkpoint brings only item vectors
                model = TGNRecommender.load(ckpt, user_head=base.user_head,
                                            statistics=not keep).eval()
                newest = max(newest, model.checkpoint_extra.get("saved_at", 0.0))
            elif keep:  # only its item vectors are taken: the run's model as read
                model = base
            else:  # before the first checkpoint the pipeline runs the run's model
                model = self.run.model().eval()
            models.append(model)
            if store.exists():
                for user, ts, version, vector, weights in zip(*load_store(store), strict=True):
                    rows[str(user)] = UserRow(shard, float(ts), int(version), vector,
                                              None if np.isnan(weights).all() else weights)
        shards = self.shards if keep else [ServingShard(m) for m in models]
        items = [ServingShard.items_of(m) for m in models] if keep else []
        with self._lock:
            for shard, (ids, t, vectors) in zip(shards if keep else [], items, strict=True):
                shard.set_items(ids, t, vectors)
            self.shards = shards
            if not keep:
                self.users = rows
            else:
                for user, row in rows.items():
                    if user not in self.users or self.users[user].version < row.version:
                        self.users[user] = row
            self._stamp, self.checkpoint_time = stamp, newest
        for shard in shards:
            shard.refresh(self._lock)
        metrics.EMBEDDING_STORE_USERS.set(len(self.users))
        metrics.CHECKPOINT_TIMESTAMP.set(newest)
        log.info("loaded %d users from %d shard(s)", len(self.users), len(shards))

    # -- the changelog -----------------------------------------------------------------------

    def apply_changelog(self, messages: list[dict], received_at: float | None = None) -> None:
        """Take ``user-embeddings`` messages: each user's newest embedding, and the events
        they applied into the shard's statistics; then refresh the caches if due."""
        if messages:
            ids = [str(m["user_id"]) for m in messages]
            owner = shard_of(ids, self.num_shards).tolist()
            applied = 0
            with self._lock:
                for shard, part in enumerate(self.shards):
                    applied += part.apply(m for m, s in zip(messages, owner, strict=True)
                                          if s == shard)
                for user, shard, m in zip(ids, owner, messages, strict=True):
                    row = self.users.get(user)
                    if row is None or row.version <= int(m["version"]):
                        weights = m.get("facet_weights")
                        self.users[user] = UserRow(
                            shard, float(m["ts"]), int(m["version"]),
                            np.asarray(m["embedding"], np.float32),
                            None if weights is None else np.asarray(weights, np.float32))
            self.changelog["records"] += len(messages)
            self.changelog["events_applied"] += applied
            self.changelog["last_record_at"] = received_at or time.time()
            metrics.EMBEDDING_STORE_USERS.set(len(self.users))
        if time.monotonic() - self._refreshed >= KNN_REFRESH_S:
            self._refreshed = time.monotonic()
            for part in self.shards:
                part.refresh(self._lock)

    def start(self) -> Recommender:
        """Re-read changed state files every :data:`RELOAD_EVERY_S` on a background thread,
        and follow the changelog on another (with a broker): no request waits for either."""
        if self._threads:
            return self
        self._threads.append(self._background("reload", self._reload_loop))
        if self.bootstrap_servers is None:
            return self
        from streaming.kafka_io import TopicReader, create_topics

        create_topics(self.bootstrap_servers, [self.topic], settings=self.kafka_settings)
        reader = TopicReader(self.bootstrap_servers, self.topic, max_batch=5000,
                             check_crcs=False, settings=self.kafka_settings)

        def run() -> None:
            try:
                follow(reader, self.apply_changelog, self._stop)
            finally:
                reader.close()

        self._threads.append(self._background("changelog", run))
        return self

    def _reload_loop(self) -> None:
        while not self._stop.wait(RELOAD_EVERY_S):
            self.reload()

    def _background(self, name: str, loop) -> threading.Thread:
        def run() -> None:
            try:
                loop()
            except Exception:  # the server keeps answering from what it has
                log.exception("%s thread stopped", name)

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Stop the background threads."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    # -- answers -----------------------------------------------------------------------------

    def recommend(self, user: str, k: int) -> dict[str, object]:
        """The top-``k`` items for ``user``; :class:`KeyError` if the user has no embedding."""
        answer = self.recommend_many([(user, k)])[0]
        if answer is None:
            raise KeyError(user)
        return answer

    def recommend_many(self, requests: list[tuple[str, int]]) -> list[dict[str, object] | None]:
        """:meth:`recommend` for ``(user, k)`` requests at once, scored in one batch per shard
        (the same scores: each row of the mixture is its own); ``None`` for a user without an
        embedding."""
        rows = [self.users.get(user) for user, _ in requests]
        members: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if row is not None:
                members.setdefault(row.shard, []).append(i)
        scored: dict[int, tuple[Tensor, Tensor, list[str], float]] = {}
        with self._lock:
            for number, batch in members.items():
                shard = self.shards[number]
                values, items = shard.top(np.stack([rows[i].embedding for i in batch]),
                                          [requests[i][0] for i in batch],
                                          max(requests[i][1] for i in batch))
                scored.update((i, (values[j, :requests[i][1]], items[j, :requests[i][1]],
                                   shard.item_ids, shard.t)) for j, i in enumerate(batch))
        return [None if row is None else self._answer(user, row, *scored[i])
                for i, ((user, k), row) in enumerate(zip(requests, rows, strict=True))]

    def _answer(self, user: str, row: UserRow, values: Tensor, indices: Tensor,
                item_ids: list[str], t: float) -> dict[str, object]:
        """The ``/recommend`` answer from a user's ``k`` best scores and item rows ``[k]``."""
        finite = torch.isfinite(values)  # -inf: probability 0 (e.g. never bought by anyone)
        values, indices = values[finite], indices[finite]
        facet = row.facet_weights
        return {
            "user_id": user, "ts": row.ts, "version": row.version, "scored_at": t,
            "facet_weights": None if facet is None or np.isnan(facet).all()
            else dict(zip(FACETS, np.round(facet, 4).tolist(), strict=True)),
            "items": [{"item_id": item_ids[i], "score": round(float(s), 4),
                       **self.items.get(item_ids[i], {})}
                      for s, i in zip(values.tolist(), indices.tolist(), strict=True)],
        }

    def health(self) -> dict[str, object]:
        """The ``/healthz`` answer."""
        age = time.time() - self.checkpoint_time if self.checkpoint_time else None
        return {"status": "ok", "users": len(self.users), "shards": self.num_shards,
                "checkpoint_age_s": age,
                "changelog": dict(self.changelog) if self.bootstrap_servers else None}


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


class _Limits:
    """ASGI middleware: 414 for a request target over :data:`MAX_TARGET_BYTES`, 413 for a
    declared body over :data:`MAX_BODY_BYTES`, before any route runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
            length = dict(scope["headers"]).get(b"content-length", b"0")
            response = None
            if target > MAX_TARGET_BYTES:
                response = _error(414, f"request target over {MAX_TARGET_BYTES} bytes")
            elif not length.isdigit() or int(length) > MAX_BODY_BYTES:
                response = _error(413, f"request body over {MAX_BODY_BYTES} bytes")
            if response is not None:
                metrics.HTTP_REQUESTS.labels("other", str(response.status_code)).inc()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Batcher:
    """``/recommend`` requests answered in batches (:meth:`Recommender.recommend_many`): the
    requests that arrive while one batch is scored, on a worker thread so the event loop keeps
    reading requests, form the next (at most :data:`MAX_BATCH`). An idle server answers a
    lone request at once; a busy one scores many per pass (on cj26 one ~12 ms alone, ~6 ms
    each in batches of 8: one pass over the item vectors and the KNN matrices for all)."""

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender
        self._pending: list[tuple[str, int, asyncio.Future]] = []
        self._draining = False

    async def answer(self, user: str, k: int) -> dict[str, object] | None:
        """The answer to one request (``None``: unknown user)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((user, k, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    answers = await loop.run_in_executor(
                        None, self.recommender.recommend_many, [(u, k) for u, k, _ in batch])
                except Exception as exc:  # each request's handler answers it with a 500
                    answers = [exc] * len(batch)
                for (*_, future), answer in zip(batch, answers, strict=True):
                    if future.done():  # the client went away
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._draining = False


def make_app(recommender: Recommender) -> Starlette:
    """The ASGI application answering from ``recommender``."""
    batcher = _Batcher(recommender)

    async def recommend(request: Request) -> Response:
        user, k = parse_recommend_query(request.url.query)
        answer = await batcher.answer(user, k)
        if answer is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, f"unknown user {user!r}")
        return JSONResponse(answer)

    def exposition(_request: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    handlers = {"/recommend": recommend,
                "/healthz": lambda _r: JSONResponse(recommender.health()),
                "/metrics": exposition,
                "/openapi.json": lambda _r: JSONResponse(OPENAPI)}

    def route(path: str):
        handler = handlers[path]

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            if request.method != "GET":
                response = _error(405, f"method {request.method} not allowed; use GET",
                                  {"Allow": "GET"})
            else:
                try:
                    response = handler(request)
                    if inspect.isawaitable(response):
                        response = await response
                except BadRequest as exc:
                    response = _error(int(exc.status), str(exc))
                except Exception:  # a bug, never the client's fault: log it, answer 500
                    log.exception("unexpected error answering GET %r", str(request.url))
                    response = _error(500, "internal error")
            metrics.HTTP_REQUESTS.labels(path, str(response.status_code)).inc()
            metrics.HTTP_REQUEST_SECONDS.labels(path).observe(time.perf_counter() - started)
            return response

        return Route(path, endpoint, methods=METHODS)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        metrics.HTTP_REQUESTS.labels("other", str(exc.status_code)).inc()
        headers = {"Allow": "GET"} if exc.status_code == 405 else None
        return _error(exc.status_code, f"no route {request.url.path}"
                      if exc.status_code == 404 else str(exc.detail), headers)

    app = Starlette(routes=[route(p) for p in ROUTES],
                    exception_handlers={HTTPException: not_found})
    app.router.redirect_slashes = False  # "/recommend/" is an unknown route (404), as before
    app.add_middleware(_Limits)
    return app


class Server:
    """uvicorn serving :func:`make_app` on a socket bound at construction (port 0 picks one).

    Args:
        recommender: what to answer from.
        host: bind address.
        port: port.
    """

    def __init__(self, recommender: Recommender, host: str = "127.0.0.1",
                 port: int = metrics.SERVER_PORT) -> None:
        self.socket = socket.create_server((host, port), reuse_port=False)
        self.server_port = self.socket.getsockname()[1]
        config = uvicorn.Config(make_app(recommender), http="h11", log_level="warning",
                                access_log=False, lifespan="off",
                                h11_max_incomplete_event_size=MAX_TARGET_BYTES + 4096)
        self._server = uvicorn.Server(config)
        self._done = threading.Event()

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (blocks)."""
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._done.set()

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to return, and wait for it."""
        self._server.should_exit = True
        self._done.wait(30)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()


def make_server(recommender: Recommender, host: str = "127.0.0.1",
                port: int = metrics.SERVER_PORT) -> Server:
    """A :class:`Server` (not yet serving) answering from ``recommender``; port 0 picks one."""
    return Server(recommender, host, port)


__all__ = ["OPENAPI", "BadRequest", "Recommender", "Server", "make_app", "make_server",
           "parse_recommend_query"]
