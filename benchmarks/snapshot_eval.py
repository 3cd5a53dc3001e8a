"""Evaluate only the weekly GConvGRU snapshot baseline (``snapshot`` extra) on a dataset.

The same protocol as ``dynllm evaluate --baselines snapshot`` (fit on train, replay train + val,
full-catalog test-then-update on test) without re-evaluating a TGN run beside it. Run under the
shared lock::

    flock /tmp/dynllm-bench.lock .venv/bin/python benchmarks/snapshot_eval.py \\
        --data data/cj26 --json benchmarks/tgn/cj26_snapshot_eval.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from streaming.dataset import Dataset
from tgn.data import EventBatch, encode_events
from tgn.evaluate import Evaluator
from tgn.experiment import markdown_table, snapshot_baseline
from tgn.ids import IdMap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--json", required=True)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Dataset.load(args.data)
    users, items = IdMap(), IdMap(data.items.column("item_id").to_pylist())
    splits = [encode_events(data.split(name), users, items) for name in ("train", "val", "test")]
    started = time.perf_counter()
    recommender = snapshot_baseline(splits, progress=False)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = Evaluator().run(recommender, splits[2], EventBatch.cat(splits[:2]), args.batch_size)
    result.update(seconds=time.perf_counter() - started, fit_seconds=fit_seconds)
    results = {"snapshot GConvGRU (weekly)": result}
    print(markdown_table(results))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
