"""``UpdateGraphMemory``: apply event batches to the sharded temporal graph memory.

Each batch is split by user into one part per shard — every shard gets a part, empty or not, so
every shard sees every batch's offsets and ``checkpoint`` mark and all of them save at the same
place. The parts are keyed by shard and applied by a stateful DoFn, which holds one
:class:`~pipelines.state.ShardState` per key (Beam keeps a key on one worker, so a shard's state
never moves while it runs) and emits the touched users' temporal embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from pipelines.elements import EventsBatch
from pipelines.state import ShardState, shard_of


class _ShardByUserFn(beam.DoFn):
    def __init__(self, num_shards: int) -> None:
        self.num_shards = num_shards

    def process(self, batch: EventsBatch):
        if self.num_shards == 1:
            yield 0, batch
            return
        shards = shard_of(batch.events.column("user_id").to_pylist(), self.num_shards)
        for shard in range(self.num_shards):
            yield shard, batch.take(shards == shard)


class _ApplyToMemoryFn(beam.DoFn):
    """Stateful: one :class:`ShardState` per shard key, checkpointed on marked batches.

    The model state is too large for Beam state (a write costs a deep-size walk; cj26's memory
    is ~28 MB), so the instance holds it and the checkpoint file is what survives a worker: the
    first batch of a key in a new instance (another worker process, a restarted pipeline) opens
    the shard's checkpoint from ``state_dir`` (:meth:`ShardState.open`), and the reader resumes
    at the checkpointed frontier, so nothing is lost or applied twice. Nothing else is kept
    between elements. A runner that moved a key to a fresh worker *while* a run goes on would
    find the shard behind the stream (it waits for micro-batches from before its checkpoint);
    the runners used here fail the job instead, and the restart resumes from the checkpoint.
    ``state_dir`` (and ``run_dir``) must therefore be paths every worker reaches.

    Attributes:
        APPLIED: events this key had applied at its last checkpoint (Beam state; it also makes
            the DoFn keyed). Written at checkpoints only: every state write costs the runner a
            deep-size walk of its cache (~5-10 ms on the in-process runner).
    """

    APPLIED = ReadModifyWriteStateSpec("applied", VarIntCoder())
    _applied = beam.DoFn.StateParam(APPLIED)

    def __init__(self, run_dir: str, state_dir: str | None, num_shards: int, fresh_state: bool,
                 evaluate_to: str | None, test_from: float, topic_id: str | None,
                 threads: int | None) -> None:
        self.run_dir, self.state_dir, self.num_shards = run_dir, state_dir, num_shards
        self.fresh_state, self.evaluate_to, self.test_from = fresh_state, evaluate_to, test_from
        self.topic_id, self.threads = topic_id, threads

    def setup(self) -> None:
        import torch

        from tgn.evaluate import Evaluator
        from tgn.run import Run

        if self.threads is not None:  # the worker's process: the command's --threads
            torch.set_num_threads(self.threads)

        # no torch.set_grad_enabled(False) here: on the in-process runner it would switch
        # gradients off for the caller's thread too; ShardState.apply runs under no_grad
        self._run = Run.open(self.run_dir)  # one read of the checkpoint for every shard
        self._shards: dict[int, ShardState] = {}
        self._unsaved: dict[int, int] = {}  # events applied since the last checkpoint
        self._evaluator = Evaluator() if self.evaluate_to else None

    def process(self, keyed: tuple[int, EventsBatch], applied=_applied):
        shard, batch = keyed
        state = self._shards.get(shard)
        if state is None:
            state = self._shards[shard] = ShardState.open(
                self._run, self.state_dir, shard, self.num_shards, self.fresh_state,
                self.topic_id)
        for ready in state.accept(batch):
            out = state.apply(ready, self._evaluator, self.test_from)
            self._unsaved[shard] = self._unsaved.get(shard, 0) + len(ready)
            if ready.span.checkpoint:
                state.save()
            if ready.span.last:  # the pipeline ends after this batch: the file must be there
                state.wait()
                applied.write((applied.read() or 0) + self._unsaved.pop(shard))
                self._write_evaluation()
            if len(out) or ready.span.checkpoint:  # an empty one still carries the checkpoint
                yield out

    def _write_evaluation(self) -> None:
        if self._evaluator is not None:
            results = self._evaluator.results()
            Path(self.evaluate_to).write_text(json.dumps(results, indent=2) + "\n")


class UpdateGraphMemory(beam.PTransform):
    """:class:`EventsBatch` es → :class:`~pipelines.elements.UserStates` per shard and batch.

    Args:
        run_dir: the trained run (``model.pt``).
        state_dir: where shards keep checkpoints (``None``: no checkpoints).
        num_shards: how many shards split the users.
        fresh_state: start from empty memory instead of the trained model's state (replay).
        evaluate_to: write test-then-update metrics (``tgn.evaluate.Evaluator``) to this JSON
            file at every checkpoint; needs ``num_shards == 1``.
        test_from: event time where scored (test) events start; earlier ones are only observed.
        topic_id: the live input topic's id, kept in the checkpoints with the positions.
        threads: torch threads of the worker process that applies the memory (``None``: as
            they are).
    """

    def __init__(self, run_dir: str, state_dir: str | None = None, num_shards: int = 1,
                 fresh_state: bool = False, evaluate_to: str | None = None,
                 test_from: float = -np.inf, topic_id: str | None = None,
                 threads: int | None = None) -> None:
        super().__init__()
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if evaluate_to and num_shards != 1:
            raise ValueError("evaluation needs a single shard (every candidate from one state)")
        self.apply_fn = _ApplyToMemoryFn(str(run_dir), state_dir and str(state_dir), num_shards,
                                         fresh_state, evaluate_to, test_from, topic_id,
                                         threads)
        self.num_shards = num_shards

    def expand(self, batches):
        return (batches
                | "ShardByUser" >> beam.ParDo(_ShardByUserFn(self.num_shards))
                .with_output_types(tuple[int, Any])  # an int key: a deterministic key coder
                | "ApplyToMemory" >> beam.ParDo(self.apply_fn))
