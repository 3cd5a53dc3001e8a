"""Over 10,000 malformed and hostile records mixed into a valid stream, through ``dynllm run``.

A seeded generator makes each bad record with the reason it must be dead-lettered for: truncated
JSON, binary junk, huge strings, oversized messages, wrong types, NaN/inf, negative and future
timestamps, missing fields, unprintable ids, deep nesting, duplicate event ids. Unknown user and
item ids are *valid* (a stream brings new shoppers and products; the model grows its id maps).
The live pipeline (a subprocess, real broker) must not crash, every bad record must be on
``purchases.dlq`` with its reason and its exact bytes, every valid event must be applied once,
and the counts must add up.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipelines.state import checkpoint_path
from streaming.deadletter import decode_raw
from streaming.kafka_io import create_topics, encode_json, json_producer
from streaming.producer import event_messages
from streaming.validation import Reason

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

N_BAD = 10_500
N_VALID = 3_000


def _mutations(rng: random.Random, event: dict, text: bytes) -> list[tuple[Reason, bytes]]:
    """Candidate bad versions of one valid ``event`` (its JSON is ``text``), with their reason."""
    def bad(**change: object) -> bytes:
        return json.dumps({**event, **change}).encode()

    cut = rng.randrange(1, len(text) - 1)
    # a continuation byte first: never valid UTF-8 (random high bytes alone can be, e.g. "é")
    junk = bytes([rng.randrange(0x80, 0xC0)]
                 + [rng.randrange(128, 256) for _ in range(rng.randrange(0, 199))])
    field = rng.choice(["event_id", "user_id", "item_id", "ts", "quantity", "price"])
    return [  # the first three are large (up to 200 kB): picked rarely, to keep the test quick
        (Reason.BAD_JSON, b"[" * 60_000),  # nesting deep enough to blow a recursive parser
        (Reason.OVERSIZED, b'{"pad": "' + b"x" * rng.randrange(70_000, 200_000) + b'"}'),
        (Reason.BAD_ID, bad(user_id="u" * rng.randrange(300, 60_000))),  # huge string
        (Reason.BAD_JSON, text[:cut]),  # truncated
        (Reason.BAD_ENCODING, junk),  # binary junk, not UTF-8
        (Reason.BAD_JSON, bytes(rng.randrange(0, 128) for _ in range(40)) + b"\x01"),
        (Reason.BAD_JSON, b""),
        (Reason.BAD_ID, bad(user_id="u" * rng.randrange(257, 2000))),  # long string
        (Reason.BAD_ID, bad(item_id="")),
        (Reason.BAD_ID, bad(user_id="ab\u0000c")),
        (Reason.BAD_ID, bad(event_id="\ud800x")),  # lone surrogate
        (Reason.BAD_ID, bad(user_id="   ")),
        (Reason.NOT_AN_OBJECT, rng.choice([b"[1, 2]", b"42", b"null", b'"text"', b"true"])),
        (Reason.MISSING_FIELD, json.dumps({k: v for k, v in event.items() if k != field})
         .encode()),
        (Reason.MISSING_FIELD, bad(**{field: None})),
        (Reason.BAD_TYPE, bad(ts="2017-01-01")),
        (Reason.BAD_TYPE, bad(quantity=True)),
        (Reason.BAD_TYPE, bad(user_id=[1, 2])),
        (Reason.BAD_TYPE, bad(price={"amount": 1})),
        (Reason.BAD_TYPE, bad(item_id=1.5)),
        (Reason.BAD_TIMESTAMP, bad(ts=-rng.uniform(1, 1e9))),
        (Reason.BAD_TIMESTAMP, text.replace(b'"ts":', b'"ts":NaN,"_old_ts":', 1)),
        (Reason.BAD_TIMESTAMP, bad(ts=10**400)),  # an integer too large for a float: inf
        (Reason.FUTURE_TIMESTAMP, bad(ts=time.time() + rng.uniform(3, 3000) * 86400)),
        (Reason.BAD_QUANTITY, bad(quantity=0)),
        (Reason.BAD_QUANTITY, text.replace(b'"quantity":', b'"quantity":Infinity,"_q":', 1)),
        (Reason.BAD_PRICE, bad(price=-0.01)),
        (Reason.BAD_PRICE, text.replace(b'"price":', b'"price":-Infinity,"_p":', 1)),
        (Reason.IMPLAUSIBLE_VALUE, bad(quantity=1e30)),
    ]


def _stream(cj_small, rng: random.Random):
    """``(records in send order, expected reason per bad record, events per user)``."""
    events = pq.read_table(cj_small / "events.parquet").slice(0, N_VALID)
    valid = [value for _key, value, _ts in event_messages(events)]
    valid += [encode_json({"event_id": f"new-{i}", "user_id": f"new-user-{i % 7}",
                           "item_id": f"new-item-{i}", "ts": 1.5e9, "quantity": 2, "price": 0})
              for i in range(20)]  # unknown ids: valid
    bad: list[tuple[Reason, bytes]] = []
    while len(bad) < N_BAD:
        text = rng.choice(valid)
        if rng.random() < 0.05:
            bad.append((Reason.DUPLICATE_EVENT_ID, text))  # an exact re-send
        else:
            kinds = _mutations(rng, json.loads(text), text)
            bad.append(rng.choice(kinds[:3] if rng.random() < 0.006 else kinds[3:]))
    records = [(None, v) for v in valid] + bad
    rng.shuffle(records)
    seen: set[bytes] = set()  # of copies of one valid event, the first read is the valid one
    for i, (reason, value) in enumerate(records):
        if reason is None or reason is Reason.DUPLICATE_EVENT_ID:
            records[i] = (Reason.DUPLICATE_EVENT_ID if value in seen else None, value)
            seen.add(value)
    users = Counter(json.loads(v)["user_id"] for r, v in records if r is None)
    return [v for _r, v in records], [(r, v) for r, v in records if r is not None], users


def test_hostile_records_all_dead_lettered_valid_ones_applied(kafka_broker, run_dir, cj_small,
                                                              tmp_path, tools):
    from tgn.model import TGNRecommender

    records, bad, per_user = _stream(cj_small, random.Random(2026))
    kinds = {r for r, _ in bad}
    assert len(bad) >= 10_000 and len(kinds) == len(Reason) - 2  # all but catalog and late
    create_topics(kafka_broker, ["purchases"], partitions=2)
    producer = json_producer(kafka_broker, max_request_size=1 << 20)
    for i, value in enumerate(records):
        producer.send("purchases", value=value, partition=i % 2)
    producer.flush()
    producer.close()

    # the records are shuffled: valid events arrive far out of event-time order, so the test
    # allows any lateness (ordering has its own test, test_out_of_order.py)
    pipeline = tools.PipelineProcess(kafka_broker, run_dir, tmp_path, len(records),
                                     checkpoint_events=10**9, extra=("--allowed-lateness", "1e9"))
    pipeline.wait_consumed(len(records))
    names = ("dynllm_events_consumed_total", "dynllm_events_valid_total",
             "dynllm_events_dead_lettered_total")

    def counts() -> tuple[float, ...]:
        return tuple(tools.metric(pipeline.port, n) or 0.0 for n in names)

    tools.wait_until(lambda: sum(counts()[1:]) == len(records), 60, "validating every record")
    assert counts() == (len(records), len(records) - len(bad), len(bad))
    pipeline.wait_sealed()
    pipeline.stop()  # no crash all along: SIGTERM → drain, checkpoint, exit 0

    letters = tools.read_json_topic(kafka_broker, "purchases.dlq", idle_s=3.0)
    assert len(letters) == len(bad)
    assert Counter(d["reason"] for d in letters) == Counter(str(r) for r, _ in bad)
    assert all(d["detail"] for d in letters)
    sent = Counter(v for _r, v in bad)
    returned = Counter(_as_bytes(decode_raw(d["raw"], d["raw_encoding"])) for d in letters)
    assert returned == sent  # the exact bytes come back, none missing, none extra
    model = TGNRecommender.load(checkpoint_path(tmp_path, 0, 1))
    counts = model.neighbors.count[model.user_node].tolist()
    applied = {u: n for u, n in zip(model.users.to_list(), counts, strict=True) if n}
    assert applied == dict(per_user)
    assert sum(model.checkpoint_extra["positions"].values()) == len(records)
    assert sum(per_user.values()) + len(letters) == len(records)


def _as_bytes(raw: object) -> bytes:
    """A dead letter's raw record as the bytes that were sent."""
    return raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogatepass")
