"""``dynllm serve`` under hostile requests: never a 5xx, loopback by default.

A real server (``make_server`` on a replayed state) gets raw HTTP requests written on a socket,
so nothing client-side cleans them up: random paths and query strings, unicode, percent garbage,
huge and odd ``k``, repeated parameters, every method. Each answer must be 2xx or 4xx; methods
other than GET get 405 with ``Allow: GET``. A bug inside a handler is a logged JSON 500 and the
server keeps serving.
"""

from __future__ import annotations

import inspect
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.outputs import load_store
from pipelines.server import Recommender, make_server
from streaming.metrics import SERVER_PORT

#: Bytes http.server would treat as the end of the request line or of a header.
_LINE_BREAKS = "\r\n"


@pytest.fixture(scope="module")
def state(run_dir: Path, cj_small: Path, tmp_path_factory) -> Path:
    """State directory of a short replay (first 600 events of ``cj_small``)."""
    from pipelines.pipeline import PipelineConfig, run_pipeline

    out = tmp_path_factory.mktemp("fuzz-state")
    run_pipeline(PipelineConfig(run_dir=str(run_dir), state_dir=str(out),
                                log_path=str(cj_small / "events.parquet"), stop_row=600,
                                fresh_state=True, max_batch=300, checkpoint_events=10**9))
    return out


def _serve(recommender: Recommender) -> Iterator[int]:
    server = make_server(recommender, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def port(run_dir: Path, state: Path) -> Iterator[int]:
    yield from _serve(Recommender(run_dir, state))


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is; ``(status, headers, body)`` of the answer (read to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":")
                                                             for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def _get(port: int, target: bytes) -> tuple[int, dict[str, str], bytes]:
    return _raw(port, b"GET " + target + b" HTTP/1.0\r\nHost: x\r\n\r\n")


_text = st.text(st.characters(blacklist_characters=_LINE_BREAKS, blacklist_categories=("Cs",)),
                max_size=40)
_percent_garbage = st.lists(st.sampled_from(["%", "%%", "%zz", "%0", "%ff", "%c3%28", "%00",
                                             "%ed%a0%80", "+", "&", "=", ";", "#", "?", "%25"]),
                            max_size=8).map("".join)
_k = st.one_of(st.integers(-10**30, 10**30).map(str), st.just("9" * 5000), _text,
               st.sampled_from(["", "1e3", "0x10", "١٢", "１２", " 5", "5_0", "nan", "-0"]))
_user = st.one_of(_text, _percent_garbage, st.sampled_from(["", "%", "u" * 10000]))


@st.composite
def _targets(draw: st.DrawFn) -> bytes:
    """A request target: a known route or random path, with a random query string."""
    path = draw(st.sampled_from(["/recommend", "/healthz", "/metrics", "/", "//recommend",
                                 "/recommend/", "/%2e%2e/etc/passwd"]) | _text.map("/".__add__))
    params = draw(st.lists(st.tuples(st.sampled_from(["user", "k", "K", "", "user[]"]),
                                     _user | _k), max_size=4))
    query = "&".join(f"{name}={value}" for name, value in params) + draw(_percent_garbage)
    target = path + ("?" + query if query or draw(st.booleans()) else "")
    return target.replace(" ", draw(st.sampled_from(["%20", "+", " "]))).encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=_targets())
def test_no_request_target_gets_a_5xx(port, target):
    status, headers, body = _get(port, target)
    assert 200 <= status < 500, (target, status, body[:300])
    if headers.get("content-type") == "application/json":
        json.loads(body)  # answers and errors come as JSON the client can read
    else:  # /metrics, or http.server's own page for a target it cannot read
        assert status == 200 or b"Error code" in body, (target, status, body[:300])


def test_known_user_with_hostile_extras_still_answers(port, state):
    user = str(load_store(state / "embeddings-shard-0-of-1.npz")[0][0])
    for target, expected in [(f"/recommend?user={user}&k=3&x=%zz", 200),
                             (f"/recommend?user={user}&k=1000", 200),
                             (f"/recommend?user={user}&k=1001", 400),
                             (f"/recommend?user={user}&k={'9' * 5000}", 400),
                             (f"/recommend?user={user}&user={user}", 400)]:
        status, _, body = _get(port, target.encode())
        assert status == expected, (target, body[:200])


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405_with_allow_get(port, method):
    status, headers, body = _raw(port, f"{method} /recommend?user=1 HTTP/1.0\r\n"
                                       "Content-Length: 2\r\n\r\n{}".encode())
    assert status == 405 and headers["allow"] == "GET"
    assert method in json.loads(body)["error"]
    status, headers, body = _raw(port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET" and body == b""


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/x.y\r\n\r\n", 400),  # not a version
    (b"GET /healthz HTTP/9.9\r\n\r\n", 505),  # the one 5xx http.server sends itself: see below
    (b"GET /a b c HTTP/1.0\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n", 414),
])
def test_malformed_request_lines_get_http_servers_error_page(port, request_bytes, status):
    """http.server answers these before our handler runs, with its HTML error page (without a
    status line when it could not read a version). HTTP/9.9 gets its 505, a protocol version
    the server does not speak: no client sends it and it reveals no fault."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_bytes)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert f"Error code: {status}".encode() in answer
    assert _get(port, b"/healthz")[0] == 200  # and it keeps serving


def test_a_bug_in_a_handler_is_a_logged_json_500_and_serving_goes_on(run_dir, state, caplog):
    recommender = Recommender(run_dir, state)
    recommender._item_vectors = []  # a shard whose items vanished: recommend() raises
    user = next(iter(recommender.users))
    for port in _serve(recommender):
        with caplog.at_level(logging.ERROR, logger="pipelines.server"):
            status, _, body = _get(port, f"/recommend?user={user}".encode())
        assert status == 500 and json.loads(body) == {"error": "internal error"}
        assert "unexpected error answering GET" in caplog.text and "IndexError" in caplog.text
        assert _get(port, b"/healthz")[0] == 200


def test_default_bind_is_loopback():
    default = inspect.signature(make_server).parameters["host"].default
    assert default == "127.0.0.1"
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["serve", "--run", "r", "--state-dir", "s"])
    assert args.host == "127.0.0.1" and args.port == SERVER_PORT
