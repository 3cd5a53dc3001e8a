"""A shard's state: graph memory, neighbour buffers and the event-time frontier, saved together.

Users are split into shards by a stable hash of their id (:func:`shard_of`). Every shard holds a
full model — weights, its users' memory and neighbours, and its own copy of every item's — and
applies its users' part of each sealed micro-batch (:mod:`pipelines.watermark`) in event-time
order. Its checkpoint ``STATE_DIR/shard-K-of-N.pt`` holds the model state *and* the frontier of
the last micro-batch it applied (resume offset per source partition, the last sealed event) in
one file written atomically (temp file + ``os.replace``, by ``TGNRecommender.save``), so a
restart resumes exactly: the sealer and the reader start at the oldest frontier of any shard,
rebuild the same micro-batches, and each shard drops what it had already applied
(:meth:`ShardState.accept`).
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipelines.applied_ids import EXTRA_KEY, AppliedIds
from pipelines.elements import EventsBatch, UserStates
from pipelines.watermark import START, BatchRule, Frontier, Key, after_key
from streaming import metrics
from streaming.errors import UsageError
from streaming.validation import RECENT_IDS_CAPACITY
from tgn.data import latest_per_user

if TYPE_CHECKING:
    from tgn.run import Run


def shard_of(user_ids: Sequence[str], num_shards: int) -> np.ndarray:
    """Shard ``[B]`` (int64) of each user id: CRC-32 of its UTF-8 bytes modulo ``num_shards``.

    >>> shard_of(["u1", "u4", "u1"], 2).tolist()
    [0, 1, 0]
    """
    if num_shards == 1:
        return np.zeros(len(user_ids), np.int64)
    return np.fromiter((zlib.crc32(u.encode()) % num_shards for u in user_ids), np.int64,
                       len(user_ids))


def checkpoint_path(state_dir: str | Path, shard: int, num_shards: int) -> Path:
    """Where shard ``shard`` of ``num_shards`` keeps its checkpoint."""
    return Path(state_dir) / f"shard-{shard}-of-{num_shards}.pt"


def check_shard_count(state_dir: str | Path, num_shards: int) -> None:
    """Refuse a state directory written with another shard count (its users are elsewhere)."""
    others = [p.name for p in Path(state_dir).glob("shard-*-of-*.pt")
              if not p.name.endswith(f"-of-{num_shards}.pt")]
    if others:
        raise UsageError(f"{state_dir} holds checkpoints for another shard count ({others[0]}); "
                         f"use that --shards value or a new --state-dir")


def resume_positions(state_dir: str | Path | None, num_shards: int) -> dict[int, int]:
    """Where the reader starts: per partition, the smallest position saved by any shard.

    A partition some shard never saw starts at 0; with no checkpoint at all, everything does.
    """
    if state_dir is None:
        return {}
    saved = []
    for shard in range(num_shards):
        path = checkpoint_path(state_dir, shard, num_shards)
        if not path.exists():
            return {}
        extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
        saved.append({int(p): int(o) for p, o in extra["positions"].items()})
    partitions = set().union(*saved)
    return {p: min(s.get(p, 0) for s in saved) for p in partitions}


def resume_frontier(state_dir: str | Path | None, num_shards: int,
                    rule: BatchRule) -> Frontier | None:
    """The oldest frontier any shard saved (the sealer restarts there), or ``None`` when some
    shard has none (no checkpoint, or one from before event-time batching).

    Raises:
        UsageError: the checkpoints were cut by another :class:`BatchRule` than ``rule``.
    """
    if state_dir is None:
        return None
    frontiers = []
    for shard in range(num_shards):
        path = checkpoint_path(state_dir, shard, num_shards)
        if not path.exists():
            return None
        extra = torch.load(path, map_location="cpu", weights_only=True)["extra"]
        if "frontier" not in extra:
            return None
        frontiers.append(Frontier.from_dict(extra["frontier"]))
    for frontier in frontiers:
        if frontier.rule and frontier.rule != asdict(rule):
            raise UsageError(f"{state_dir} was cut into micro-batches by {frontier.rule}, not "
                             f"{asdict(rule)}: the state would not be a function of the log; "
                             "use the same --batch-* options or a new --state-dir")
    return min(frontiers, key=lambda f: f.last)


class ShardState:
    """One shard's model plus the next offset it expects per partition.

    Args:
        model: the shard's ``TGNRecommender`` (weights + state).
        shard: this shard's number.
        num_shards: how many shards split the users.
        positions: next unapplied offset per partition.
        path: checkpoint file (``None``: never saved).
        topic_id: id of the input topic the positions belong to, saved with them (a recreated
            topic has a new id: :func:`pipelines.outages.prepare_input_log`).
    """

    def __init__(self, model, shard: int, num_shards: int, positions: dict[int, int],
                 path: Path | None, topic_id: str | None = None,
                 frontier: Frontier | None = None) -> None:
        self.model, self.shard, self.num_shards = model, shard, num_shards
        self.positions, self.path, self.topic_id = positions, path, topic_id
        self.frontier = frontier  # of the last micro-batch applied (saved with the positions)
        self.last: Key = frontier.last if frontier is not None else START
        self._saved = dict(positions)  # positions of the last checkpoint
        self._saved_last = self.last
        self._writer: threading.Thread | None = None  # the checkpoint write in progress
        # this shard's part of the duplicate filter, saved with the positions it goes with
        self.applied_ids = AppliedIds(RECENT_IDS_CAPACITY // num_shards)
        self._pending: list[EventsBatch] = []

    @classmethod
    def open(cls, run: Run | str | Path, state_dir: str | Path | None, shard: int,
             num_shards: int, fresh_state: bool = False,
             topic_id: str | None = None) -> ShardState:
        """Resume from the shard's checkpoint if there is one, else start from the run's model.

        Args:
            run: the trained run (a :class:`tgn.run.Run`, opened once for all of a worker's
                shards: its checkpoint is read once), or its directory.
            fresh_state: start from the trained weights with empty memory (replay from scratch).
            topic_id: the input topic's id now (``None``: keep the checkpoint's).
        """
        from tgn.run import Run

        run = run if isinstance(run, Run) else Run.open(run)
        path = checkpoint_path(state_dir, shard, num_shards) if state_dir else None
        if path is not None and path.exists():
            from tgn.model import TGNRecommender

            model = TGNRecommender.load(path, user_head=run.user_head())
            extra = model.checkpoint_extra
            positions = {int(p): int(o) for p, o in extra["positions"].items()}
            metrics.CHECKPOINT_TIMESTAMP.set(extra.get("saved_at", 0.0))
            frontier = Frontier.from_dict(extra["frontier"]) if "frontier" in extra else None
            state = cls(model.eval(), shard, num_shards, positions, path,
                        topic_id or extra.get("topic_id"), frontier)
            state.applied_ids = AppliedIds.from_tensor(model.checkpoint_extra.get(EXTRA_KEY),
                                                       state.applied_ids.capacity)
            return state
        model = run.model().eval()
        if fresh_state:
            model.reset_state()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        return cls(model, shard, num_shards, {}, path, topic_id)

    def accept(self, batch: EventsBatch) -> Iterator[EventsBatch]:
        """The sealed micro-batches now ready to apply, in order, less what was applied before.

        A micro-batch sealed after one this shard has not seen yet waits for it; after a
        restart from an older checkpoint than this shard's (another shard's), the micro-batches
        the shard had applied come again and are dropped (events up to :attr:`last`).
        """
        self._pending.append(batch)
        while (ready := self._next_ready()) is not None:  # an empty batch is falsy
            self._pending.remove(ready)
            frontier = ready.frontier
            if frontier.last < self.last:
                continue  # wholly applied before the restart
            fresh = ready.take(after_key(ready.events, self.last)) if len(ready) else ready
            self.frontier, self.last = frontier, frontier.last
            self.positions = dict(frontier.resume)
            yield fresh

    def _next_ready(self) -> EventsBatch | None:
        """The pending micro-batch sealed first among those sealed right after (or before)
        what this shard applied, or ``None``."""
        ready = [b for b in self._pending if b.after <= self.last]
        return min(ready, key=lambda b: b.after, default=None)

    @torch.no_grad()
    def apply(self, batch: EventsBatch, evaluator=None, test_from: float = -np.inf) -> UserStates:
        """Apply a batch's events in event-time order; the touched users' temporal embeddings.

        Args:
            batch: this shard's events (any order).
            evaluator: a :class:`tgn.evaluate.Evaluator`: a batch from ``test_from`` on is
                scored before it is applied (test-then-update); an earlier one only observed.
            test_from: event time where the evaluated (test) events start.
        """
        if len(batch) == 0:
            return self._empty(batch)
        # event time, ties by event id (as datasets are sorted): arrival order cannot matter
        order = pc.sort_indices(batch.events, [("ts", "ascending"),
                                               ("event_id", "ascending")]).to_numpy()
        events = batch.events.take(order)
        self._remember_ids(batch, order)
        model = self.model
        encoded = model.encode(events)
        started = time.perf_counter()
        if evaluator is not None and len(encoded):
            if float(encoded.t[0]) >= test_from:
                evaluator.record(encoded, model.score(encoded))
            else:
                evaluator.observe(encoded)
        before = model.neighbors.count[model.user_node[encoded.users]].numpy().copy()
        model.update(encoded)
        users, ts, inverse, first = latest_per_user(encoded.users.numpy(), encoded.t.numpy())
        first_produced = np.full(len(users), np.inf)
        np.minimum.at(first_produced, inverse, batch.produced_at[order])
        user_index = torch.from_numpy(users)
        t = torch.from_numpy(ts)
        nodes = model.user_node[user_index]
        z = model.embed_nodes(nodes, t)  # the temporal embedding, before any fusion head
        z = model.projection(z, (t - model.memory.last_update[nodes]).clamp_min(0))
        metrics.MEMORY_UPDATE_SECONDS.observe(time.perf_counter() - started)
        metrics.MEMORY_UPDATE_BATCH_EVENTS.observe(len(encoded))
        if len(encoded):
            metrics.LAST_EVENT_TIMESTAMP.set(float(ts.max()))
        return UserStates(
            shard=self.shard, span=batch.span.mark("memory"),
            user_ids=model.users.decode(users),
            user_index=users, ts=ts, version=model.neighbors.count[nodes].numpy(),
            events_before=before[first], temporal=z.numpy().astype(np.float32),
            produced_at=batch.produced_at, first_produced_at=first_produced,
            event_user=inverse.astype(np.int64), event_items=events.column("item_id").to_pylist(),
            event_ts=encoded.t.numpy())

    def _remember_ids(self, batch: EventsBatch, order: np.ndarray) -> None:
        """Keep the ids of the applied events below the resume positions: those the restarted
        reader does not read again (one read again must not be taken for its own duplicate)."""
        resume = batch.frontier.resume if batch.frontier is not None else {}
        parts, offsets = batch.partitions[order], batch.offsets[order]
        below = np.ones(len(order), bool)
        for partition, start in resume.items():
            below &= (parts != partition) | (offsets < start)
        ids = batch.events.column("event_id").take(order).filter(pa.array(below))
        self.applied_ids.add(ids, parts[below], offsets[below])

    def _empty(self, batch: EventsBatch) -> UserStates:
        none = np.zeros(0, np.int64)
        return UserStates(self.shard, batch.span.mark("memory"), [], none, np.zeros(0), none, none,
                          np.zeros((0, self.model.config.embed_dim), np.float32),
                          batch.produced_at, np.zeros(0))

    def save(self) -> None:
        """Write model state and positions to the checkpoint, atomically, in the background.

        The model's tensors are copied first, so the file holds exactly the state at this point
        and the positions that go with it while the stream goes on; the previous write is finished
        first, so checkpoints land in order; :meth:`wait` waits for it.
        """
        if self.path is None or (self.positions == self._saved and self.last == self._saved_last
                                 and self.path.exists()):
            return  # nothing applied since the last checkpoint
        self.wait()
        snapshot = _snapshot(self.model)
        self._saved, self._saved_last = dict(self.positions), self.last
        extra = {"positions": dict(self.positions), "saved_at": time.time(),
                 "shard": self.shard, "num_shards": self.num_shards, "topic_id": self.topic_id,
                 EXTRA_KEY: self.applied_ids.to_tensor()}
        if self.frontier is not None:
            extra["frontier"] = self.frontier.to_dict()

        def write() -> None:
            from tgn.model import write_checkpoint

            write_checkpoint({**snapshot, "extra": extra}, self.path)
            metrics.CHECKPOINT_TIMESTAMP.set(extra["saved_at"])

        self._writer = threading.Thread(target=write, name=f"checkpoint-{self.shard}")
        self._writer.start()

    def wait(self) -> None:
        """Block until this shard's last checkpoint write is on disk."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None


def _snapshot(model) -> dict:
    """``model``'s checkpoint payload now, to write while the model goes on: tensors cloned
    (a ~28 MB memcpy for cj26's 52k nodes; deep-copying the model took 25-30 ms, the id maps'
    dicts element by element even seconds)."""
    payload = model.checkpoint_payload()
    payload["state"] = {name: tensor.clone() for name, tensor in payload["state"].items()}
    return payload

