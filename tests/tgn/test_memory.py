"""Memory and neighbour buffer on tiny hand-built event streams, expected tensors by hand."""

from __future__ import annotations

import math

import torch

from tgn.memory import Memory, TimeEncoder
from tgn.neighbors import NeighborBuffer


def _memory(aggregation: str = "last") -> Memory:
    torch.manual_seed(0)
    # time width 1: the encoder starts at w = 1 per hour, b = 0, so enc(Δt) = cos(Δt / 3600)
    return Memory(4, memory_dim=2, msg_dim=1, time_encoder=TimeEncoder(1),
                  aggregation=aggregation).eval()


T_10_20 = torch.tensor([10.0, 20.0], dtype=torch.float64)
MSG_1_2 = torch.tensor([[1.0], [2.0]])


def _enc(seconds: float) -> float:
    return math.cos(seconds / 3600)


def test_last_aggregation_uses_each_nodes_latest_event():
    mem = _memory("last")
    # events: 0→2 at t=10 (msg 1), 0→3 at t=20 (msg 2); node 1 takes no part
    with torch.no_grad():
        mem.update_state(torch.tensor([0, 0]), torch.tensor([2, 3]), T_10_20, MSG_1_2)
        zero2 = [0.0, 0.0]
        # message = [own memory (0,0) ‖ other's memory (0,0) ‖ enc(t - last_update) ‖ msg]
        expected_in = torch.tensor([zero2 + zero2 + [_enc(20), 2.0],   # node 0: its latest, t=20
                                    zero2 + zero2 + [_enc(10), 1.0],   # node 2: t=10
                                    zero2 + zero2 + [_enc(20), 2.0]])  # node 3: t=20
        expected = mem.gru(expected_in, torch.zeros(3, 2))
    torch.testing.assert_close(mem.memory[[0, 2, 3]], expected)
    assert mem.memory[1].abs().sum() == 0  # untouched
    assert mem.last_update.tolist() == [20.0, 0.0, 10.0, 20.0]

    # next batch: 2→0 at t=30 (msg 3); node 2 last updated at 10, node 0 at 20
    before = mem.memory.clone()
    with torch.no_grad():
        mem.update_state(torch.tensor([2]), torch.tensor([0]),
                         torch.tensor([30.0], dtype=torch.float64), torch.tensor([[3.0]]))
        msg2 = torch.cat([before[2], before[0], torch.tensor([_enc(20), 3.0])])
        msg0 = torch.cat([before[0], before[2], torch.tensor([_enc(10), 3.0])])
        expected = mem.gru(torch.stack([msg0, msg2]), before[[0, 2]])
    torch.testing.assert_close(mem.memory[[0, 2]], expected)
    torch.testing.assert_close(mem.memory[[1, 3]], before[[1, 3]])
    assert mem.last_update.tolist() == [30.0, 0.0, 30.0, 20.0]


def test_mean_aggregation_averages_messages_and_keeps_latest_time():
    mem = _memory("mean")
    with torch.no_grad():
        mem.update_state(torch.tensor([0, 0]), torch.tensor([2, 3]), T_10_20, MSG_1_2)
        # node 0: mean of [0,0,0,0, enc(10), 1] and [0,0,0,0, enc(20), 2]
        msg0 = torch.tensor([[0.0, 0.0, 0.0, 0.0, (_enc(10) + _enc(20)) / 2, 1.5]])
        expected = mem.gru(msg0, torch.zeros(1, 2))
    torch.testing.assert_close(mem.memory[[0]], expected)
    assert mem.last_update[0] == 20.0


def test_gradients_reach_the_gru_and_detach_cuts_them():
    mem = _memory().train()
    mem.update_state(torch.tensor([0]), torch.tensor([1]),
                     torch.tensor([5.0], dtype=torch.float64), torch.tensor([[1.0]]))
    both = torch.tensor([0, 1])
    mem.get(both).sum().backward()
    assert mem.gru.weight_ih.grad.abs().sum() > 0
    assert not mem.memory.requires_grad  # the buffer itself never holds a graph
    torch.testing.assert_close(mem.get(both), mem.memory[both])
    mem.detach()
    assert not mem.get(both).requires_grad


def test_reset_and_grow_keep_shapes_and_old_rows():
    mem = _memory()
    with torch.no_grad():
        mem.update_state(torch.tensor([0]), torch.tensor([1]),
                         torch.tensor([5.0], dtype=torch.float64), torch.tensor([[1.0]]))
    old = mem.memory.clone()
    mem.grow(6)
    assert mem.memory.shape == (6, 2) and mem.last_update.shape == (6,)
    torch.testing.assert_close(mem.memory[:4], old)
    assert mem.memory[4:].abs().sum() == 0
    mem.reset_state()
    assert mem.memory.abs().sum() == 0 and mem.last_update.abs().sum() == 0


def test_neighbor_ring_keeps_the_latest_per_node():
    buf = NeighborBuffer(4, size=2)
    # events (src, dst, t): (0,2,1) (0,3,2) (0,2,3) (1,3,4)
    buf.insert(torch.tensor([0, 0, 0, 1]), torch.tensor([2, 3, 2, 3]),
               torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    # node 0 met 2@1, 3@2, 2@3: the ring keeps the last two; writes go to slots 0,1,0 → 2@1
    # is overwritten by 2@3 in slot 0 and 3@2 sits in slot 1
    assert buf.neighbor.tolist() == [[2, 3], [3, -1], [0, 0], [0, 1]]
    assert buf.time.tolist() == [[3.0, 2.0], [4.0, 0.0], [1.0, 3.0], [2.0, 4.0]]
    assert buf.count.tolist() == [3, 1, 2, 2]
    # (1,2,5): node 1's next slot is 1 (count 1); node 2's is 0 (count 2), replacing 0@1
    buf.insert(torch.tensor([1]), torch.tensor([2]), torch.tensor([5.0], dtype=torch.float64))
    assert buf.neighbor[[1, 2]].tolist() == [[3, 2], [1, 0]]
    assert buf.time[[1, 2]].tolist() == [[4.0, 5.0], [5.0, 3.0]]
    ids, times, valid = buf(torch.tensor([1, 3]))
    assert valid.tolist() == [[True, True], [True, True]] and ids.shape == times.shape == (2, 2)
