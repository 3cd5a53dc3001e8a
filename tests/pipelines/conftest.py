"""Fixtures of the pipeline tests: an untrained run on the ``cj_small`` slice, and replays."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.elements import BATCH_EVENTS


@pytest.fixture(scope="session")
def run_dir(cj_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with an untrained TGN covering ``cj_small`` (plumbing, not accuracy)."""
    from pipelines.bench import untrained_run

    torch.manual_seed(0)
    return Path(untrained_run(str(cj_small), tmp_path_factory.mktemp("run")))


def _replay(run_dir: Path, data: Path, state_dir: Path | None, shards: int = 1,
            stop_row: int | None = None, batch: int = 1000, rows: int | None = None,
            batch_events: int = BATCH_EVENTS) -> None:
    """Replay ``data``'s log through the pipeline (resuming from ``state_dir`` if it holds one).

    ``stop_row`` stops reading there (the open micro-batch stays open, as after a crash);
    ``rows`` replays a log of the first ``rows`` events only (its end seals every batch);
    ``batch_events`` micro-batches of that many events (in one event-time window of 10^9 s).
    """
    import pyarrow.parquet as pq

    from pipelines.pipeline import PipelineConfig, run_pipeline

    log = data / "events.parquet"
    if rows is not None:
        log = Path(state_dir) / f"first-{rows}.parquet"
        log.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(data / "events.parquet").slice(0, rows), log)
    window = {} if batch_events == BATCH_EVENTS else {"batch_events": batch_events,
                                                      "batch_window_s": 1e9}
    run_pipeline(PipelineConfig(run_dir=str(run_dir), state_dir=state_dir and str(state_dir),
                                shards=shards, log_path=str(log), stop_row=stop_row,
                                fresh_state=True, max_batch=batch, checkpoint_events=10**9,
                                **window))


@pytest.fixture(scope="session")
def replay():
    """``replay(run_dir, data_dir, state_dir, shards=1, stop_row=None, batch=1000, rows=None,
    batch_events=BATCH_EVENTS)``."""
    return _replay


@pytest.fixture(scope="session")
def one_shard_state(run_dir: Path, cj_small: Path, tmp_path_factory) -> Path:
    """State directory of a full one-shard replay of ``cj_small``."""
    state = tmp_path_factory.mktemp("state1")
    _replay(run_dir, cj_small, state)
    return state
