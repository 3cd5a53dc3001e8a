"""The run directory: one object owns its layout and reads each file once."""

from __future__ import annotations

import pytest
import torch

from streaming.errors import UsageError
from tgn.ids import IdMap
from tgn.model import TGNConfig, TGNRecommender
from tgn.run import Run

SMALL = TGNConfig(memory_dim=8, time_dim=4, embed_dim=8, heads=2, neighbors=3)


def test_a_run_is_read_once_and_builds_independent_models(tmp_path):
    torch.manual_seed(0)
    trained = TGNRecommender(SMALL, IdMap(["u1", "u2"]), IdMap(["a", "b", "c"]))
    Run(tmp_path).write(trained, {"model": "tgn", "data": "/data/x"},
                        [{"epoch": 1, "loss": 0.7, "val_recall@10": 0.1}])
    assert {p.name for p in tmp_path.iterdir()} == {Run.MODEL, Run.CONFIG, Run.HISTORY,
                                                    Run.CURVES}
    run = Run.open(tmp_path)
    assert run.name == "TGN" and not run.is_dynllm and run.user_head() is None
    assert str(run.data_dir) == "/data/x"
    first = run.model()
    run.model_path.unlink()  # read once: later models come from the payload already read
    second = run.model()
    for name, value in trained.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(first.state_dict()[name], value), name
    with torch.no_grad():
        first.memory.memory.add_(1.0)  # one model's state is not the other's
    assert not torch.equal(first.memory.memory, second.memory.memory)


def test_opening_a_directory_without_a_model_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a run directory"):
        Run.open(tmp_path)
