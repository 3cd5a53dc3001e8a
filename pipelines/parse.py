"""``ParseAndValidate`` (raw batches → event tables + dead letters) and ``WriteDeadLetters``.

Every record goes through :func:`streaming.validation.validate_event`; a bad one becomes a
:class:`~streaming.validation.DeadLetter` on the tagged output ``dead_letters`` with its reason,
so ``valid + dead-lettered == read`` for every batch (counted in Prometheus too).
"""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
from apache_beam import pvalue

from pipelines.elements import EventsBatch, RawBatch
from streaming import metrics
from streaming.kafka_settings import PLAINTEXT, KafkaSettings
from streaming.schema import EVENT_SCHEMA, REQUIRED_EVENT_FIELDS, events_to_table
from streaming.validation import (
    MAX_ID_CHARS,
    DeadLetter,
    Reason,
    RecentIds,
    ValidationRules,
    validate_event,
)

#: Tag of the dead-letter output of :class:`ParseAndValidate`.
DEAD_LETTERS = "dead_letters"


def _surely_valid(table: pa.Table, rules: ValidationRules) -> np.ndarray:
    """``[B]`` bool: rows that pass every check of ``validate_event``, found with Arrow kernels.

    Conservative: a row it cannot vouch for (a non-ASCII id, an unexpected column type) is left
    to ``validate_event``, which stays the one authority on reasons.
    """
    ok = np.ones(table.num_rows, bool)
    for name in ("event_id", "user_id", "item_id", "basket_id", "store_id"):
        if name not in table.column_names:
            if name in REQUIRED_EVENT_FIELDS:
                return ~ok
            continue
        col = table.column(name)
        if not pa.types.is_string(col.type):
            return ~ok
        length = pc.utf8_length(col)
        good = pc.and_kleene(pc.and_kleene(pc.greater(length, 0),
                                           pc.less_equal(length, MAX_ID_CHARS)),
                             pc.and_kleene(pc.string_is_ascii(col), pc.utf8_is_printable(col)))
        good = pc.and_not_kleene(good, pc.utf8_is_space(col))
        fill = name not in REQUIRED_EVENT_FIELDS  # an optional id may be null
        ok &= good.fill_null(fill).to_numpy(zero_copy_only=False)
    values = {}
    for name in ("ts", "quantity", "price"):
        if not pa.types.is_floating(table.column(name).type):
            return ~ok
        values[name] = table.column(name).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore"):
        ok &= np.isfinite(values["ts"]) & (values["ts"] >= 0)
        ok &= values["ts"] <= rules.clock() + rules.max_future_skew_s
        ok &= np.isfinite(values["quantity"]) & (values["quantity"] > 0)
        ok &= np.isfinite(values["price"]) & (values["price"] >= 0)
        ok &= (values["quantity"] <= rules.max_quantity) & (values["price"] <= rules.max_price)
    if rules.catalog is not None:
        catalog = pa.array(list(rules.catalog), pa.string())
        ok &= pc.is_in(table.column("item_id"), catalog).to_numpy(zero_copy_only=False)
    return ok


def _rows(table: pa.Table, raw: list | None, index: np.ndarray) -> list:
    """The original records at ``index``: ``raw`` ones if given, else the table's rows."""
    return [raw[i] for i in index] if raw is not None else table.take(index).to_pylist()


def _validate_table(table: pa.Table, rules: ValidationRules, recent: RecentIds,
                    raw: list | None = None):
    """Validate parsed rows: ``(events table in input order, [B] valid mask, dead letters)``.

    Args:
        raw: the records the rows were parsed from (dead letters keep these), if any.
    """
    fast = _surely_valid(table, rules)
    if raw is not None:  # the size limit applies to the record as received
        fast &= np.fromiter((len(r) <= rules.max_bytes for r in raw), bool, len(raw))
    fast_ids = table.column("event_id").filter(pa.array(fast)).to_pylist()
    fresh = np.fromiter((recent.add(e) for e in fast_ids), bool, len(fast_ids))
    dup = np.flatnonzero(fast)[~fresh]
    letters = [DeadLetter(Reason.DUPLICATE_EVENT_ID, f"event_id {e!r}", row)
               for e, row in zip(np.array(fast_ids, object)[~fresh], _rows(table, raw, dup),
                                 strict=True)]
    good = fast.copy()
    good[dup] = False
    slow = np.flatnonzero(~fast)
    results = [validate_event(row, rules, recent) for row in _rows(table, raw, slow)]
    rescued = np.fromiter((type(r) is not DeadLetter for r in results), bool, len(results))
    letters += [r for r in results if type(r) is DeadLetter]
    events = table.filter(pa.array(good))
    events = events.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA) if good.any() else \
        events_to_table([])
    if rescued.any():  # rebuild in input order: fast rows as they were, rescued rows re-typed
        fixed = events_to_table([r for r in results if type(r) is not DeadLetter])
        rows = np.concatenate([np.flatnonzero(good), slow[rescued]])
        events = pa.concat_tables([events, fixed]).take(np.argsort(rows, kind="stable"))
        good[slow[rescued]] = True
    return events, good, letters


#: Every event field, nullable: what JSON records are parsed into in one Arrow call.
_JSON_SCHEMA = pa.schema([pa.field(f.name, f.type, nullable=True) for f in EVENT_SCHEMA])


def _json_table(values: list) -> pa.Table | None:
    """All JSON records (``bytes``) of a batch parsed in one Arrow call, or ``None`` if any of
    them stands in the way (not bytes, a newline inside, bad JSON, a field of another type)."""
    if not values or not all(type(v) is bytes and b"\n" not in v for v in values):
        return None
    options = pa_json.ParseOptions(explicit_schema=_JSON_SCHEMA,
                                   unexpected_field_behavior="ignore")
    try:  # one thread: Arrow's pool costs ~2.5 ms a call, a poll's records parse in 0.4-0.8
        table = pa_json.read_json(io.BytesIO(b"\n".join(values)), parse_options=options,
                                  read_options=pa_json.ReadOptions(use_threads=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return None
    return table if table.num_rows == len(values) else None


def _validate_list(values: list, rules: ValidationRules, recent: RecentIds):
    """Validate raw records: ``(events table in input order, [B] valid mask, dead letters)``.

    A batch of well-formed JSON is parsed by Arrow at once and checked like log rows; otherwise
    every record goes through ``validate_event``.
    """
    table = _json_table(values)
    if table is not None:
        return _validate_table(table, rules, recent, raw=values)
    results = [validate_event(value, rules, recent) for value in values]
    good = np.fromiter((type(r) is not DeadLetter for r in results), bool, len(results))
    events = events_to_table([r for r, ok in zip(results, good, strict=True) if ok])
    return events, good, [r for r, ok in zip(results, good, strict=True) if not ok]


class _ValidateFn(beam.DoFn):
    def __init__(self, rules: ValidationRules | None, state_dir: str | None,
                 num_shards: int, start: dict[int, int] | None) -> None:
        self.rules, self.state_dir, self.num_shards = rules, state_dir, num_shards
        self.start = start

    def setup(self) -> None:
        from pipelines.applied_ids import load_applied_ids

        self._recent = RecentIds()
        for event_id in load_applied_ids(self.state_dir, self.num_shards, self.start):
            self._recent.add(event_id)  # where the filter stood at the checkpoints
        metrics.init_label_values(metrics.EVENTS_DEAD_LETTERED, "reason", Reason)

    def process(self, batch: RawBatch):
        rules = self.rules or ValidationRules()
        validate = _validate_table if isinstance(batch.values, pa.Table) else _validate_list
        events, good, letters = validate(batch.values, rules, self._recent)
        for letter in letters:
            metrics.EVENTS_DEAD_LETTERED.labels(str(letter.reason)).inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, letter)
        metrics.EVENTS_VALID.inc(int(good.sum()))
        yield EventsBatch(batch.span.mark("parse"), events, batch.offsets[good],
                          batch.produced_at[good], batch.partitions[good])


class ParseAndValidate(beam.PTransform):
    """Raw batches → :class:`~pipelines.elements.EventsBatch` (main) + dead letters (tagged).

    Args:
        rules: validation options (catalog, clock skew, size limit).
        state_dir: shard checkpoints whose event ids (:mod:`pipelines.applied_ids`) fill the
            duplicate filter at start (``None``: it starts empty).
        num_shards: how many shards checkpoint there.
        start: where the reader starts (per partition): only ids read below it fill the filter
            (``None``: every saved id).

    Returns (from ``expand``):
        A ``DoOutputsTuple``: ``[None]`` is the events, ``[DEAD_LETTERS]`` the dead letters.
    """

    def __init__(self, rules: ValidationRules | None = None, state_dir: str | None = None,
                 num_shards: int = 1, start: dict[int, int] | None = None) -> None:
        super().__init__()
        self.rules, self.state_dir, self.num_shards = rules, state_dir, num_shards
        self.start = start

    def expand(self, batches):
        validate = _ValidateFn(self.rules, self.state_dir, self.num_shards, self.start)
        return batches | "Validate" >> beam.ParDo(validate).with_outputs(DEAD_LETTERS,
                                                                         main="events")


class _WriteDeadLettersFn(beam.DoFn):
    def __init__(self, bootstrap_servers: str | None, path: str | None,
                 settings: KafkaSettings) -> None:
        self.bootstrap_servers, self.path, self.settings = bootstrap_servers, path, settings

    def setup(self) -> None:
        from streaming.deadletter import JsonlDeadLetterSink, KafkaDeadLetterSink

        self._sink = (KafkaDeadLetterSink(self.bootstrap_servers, settings=self.settings)
                      if self.bootstrap_servers
                      else JsonlDeadLetterSink(self.path))

    def process(self, letter: DeadLetter):
        self._sink.write(letter)

    def finish_bundle(self) -> None:
        self._sink.flush()

    def teardown(self) -> None:
        self._sink.close()


class WriteDeadLetters(beam.PTransform):
    """Send dead letters to the Kafka topic ``purchases.dlq`` (live, with the Kafka TLS/SASL
    ``settings``) or a JSONL file (replay)."""

    def __init__(self, bootstrap_servers: str | None = None, path: str | None = None,
                 settings: KafkaSettings = PLAINTEXT) -> None:
        super().__init__()
        if (bootstrap_servers is None) == (path is None):
            raise ValueError("give exactly one of bootstrap_servers and path")
        self.bootstrap_servers, self.path, self.settings = bootstrap_servers, path, settings

    def expand(self, letters):
        return letters | "Write" >> beam.ParDo(_WriteDeadLettersFn(self.bootstrap_servers,
                                                                  self.path, self.settings))
