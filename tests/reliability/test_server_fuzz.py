"""``dynllm serve`` under hostile requests: never a 5xx, loopback by default.

A real server (``make_server`` on a replayed state) gets raw HTTP requests written on a socket,
so nothing client-side cleans them up: random paths and query strings, unicode, percent garbage,
huge and odd ``k``, repeated parameters, every method. Each answer must be 2xx or 4xx; methods
other than GET get 405 with ``Allow: GET``. A bug inside a handler is a logged JSON 500 and the
server keeps serving. Then schemathesis generates requests from the server's own OpenAPI schema
(``/openapi.json``) and checks that none gets a 5xx and every answer matches the schema.
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
import schemathesis
import schemathesis.specs.openapi.checks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.outputs import load_store
from pipelines.server import MAX_TARGET_BYTES, Recommender, make_server
from streaming.metrics import SERVER_PORT

#: uvicorn's answer to a request its HTTP parser (h11) cannot read, before any route runs.
_UNPARSED = b"Invalid HTTP request received."
#: Bytes the HTTP parser would treat as the end of the request line or of a header.
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
    else:  # /metrics, or uvicorn's own 400 for a target its HTTP parser (h11) cannot read
        assert status == 200 or (status == 400 and body == _UNPARSED), (target, status,
                                                                          body[:300])


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
    (b"GET /healthz HTTP/9.9\r\n\r\n", 200),  # h11 reads any HTTP/d.d, answers in HTTP/1.1
    (b"GET /a b c HTTP/1.0\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
    # over MAX_TARGET_BYTES, under h11's buffer: read whole, so the server closes with nothing
    # unread (a 70 kB target was answered before its tail arrived, and the close then reset
    # the connection under the client's read now and then)
    (b"GET /" + b"a" * (MAX_TARGET_BYTES + 1000) + b" HTTP/1.0\r\n\r\n", 414),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413),
])
def test_malformed_or_oversized_requests_get_a_4xx(port, request_bytes, status):
    """uvicorn answers what h11 cannot parse with its plain-text 400 before any route runs; a
    target over the server's limit gets a JSON 414, a declared body over it a JSON 413."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request_bytes)
        sock.shutdown(socket.SHUT_WR)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    if status == 400:
        assert answer.endswith(_UNPARSED)
    elif status != 200:
        assert b'{"error":' in answer
    assert _get(port, b"/healthz")[0] == 200  # and it keeps serving


def test_a_bug_in_a_handler_is_a_logged_json_500_and_serving_goes_on(run_dir, state, caplog):
    recommender = Recommender(run_dir, state)
    recommender.shards[0].item_vectors = None  # a shard whose items vanished: recommend() raises
    user = next(iter(recommender.users))
    for port in _serve(recommender):
        with caplog.at_level(logging.ERROR, logger="pipelines.server"):
            status, _, body = _get(port, f"/recommend?user={user}".encode())
        assert status == 500 and json.loads(body) == {"error": "internal error"}
        assert "unexpected error answering GET" in caplog.text and "Traceback" in caplog.text
        assert _get(port, b"/healthz")[0] == 200


def test_default_bind_is_loopback():
    default = inspect.signature(make_server).parameters["host"].default
    assert default == "127.0.0.1"
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["serve", "--run", "r", "--state-dir", "s"])
    assert args.host == "127.0.0.1" and args.port == SERVER_PORT




@pytest.fixture(scope="module")
def api_schema(port: int):
    """The running server's own OpenAPI document, loaded by schemathesis."""
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode))
def test_schemathesis_finds_no_5xx_and_answers_match_the_schema(api_schema, mode):
    """Property-based requests generated from ``/openapi.json`` (schema-valid ones, then
    schema-violating ones): no 5xx, and every status, content type and body as the schema
    documents them."""
    checks = [schemathesis.checks.not_a_server_error,
              schemathesis.specs.openapi.checks.status_code_conformance,
              schemathesis.specs.openapi.checks.content_type_conformance,
              schemathesis.specs.openapi.checks.response_schema_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} == {"/recommend", "/healthz", "/metrics"}
    if mode == schemathesis.GenerationMode.NEGATIVE:  # only a route with parameters has
        operations = [op for op in operations if op.path == "/recommend"]  # invalid requests
    for operation in operations:
        @settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            case.call_and_validate(checks=checks)

        check()
