"""``dynllm bench memory``: memory-update throughput against PyG and a bare GRU cell.

Three contenders run on the same random events (uniform endpoints over ``num_nodes``, sorted
times, 2 raw features), in the same process, with a fixed torch thread count, in eval mode:

* ours — :meth:`tgn.memory.Memory.update_state` (``"last"`` aggregation);
* PyG — ``torch_geometric.nn.models.tgn.TGNMemory.update_state`` with ``IdentityMessage`` and
  ``LastAggregator`` (its message store is a per-node Python dict);
* the GRU limit — one ``torch.nn.GRUCell`` forward on ``[2B, 2D + T + msg]`` per batch: two node
  updates per event and nothing else, a bound for any GRU memory.

Contenders alternate pass by pass (one round = one pass of each over all events); rates are
medians over rounds, ratios are medians of the per-round ratios (same load within a round).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from tgn.memory import Memory, TimeEncoder, gru_input_dim

Events = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def random_events(num_events: int, num_nodes: int, msg_dim: int, seed: int) -> Events:
    """``src, dst [E]``, sorted times ``t [E]`` (int64 seconds) and features ``[E, msg_dim]``."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(num_nodes, (num_events,), generator=gen)
    dst = torch.randint(num_nodes, (num_events,), generator=gen)
    t = torch.sort(torch.randint(0, 10 * num_events, (num_events,), generator=gen)).values
    return src, dst, t, torch.rand(num_events, msg_dim, generator=gen)


def _interleaved_seconds(runs: dict[str, Callable[[], None]],
                         resets: dict[str, Callable[[], None]], repeats: int
                         ) -> dict[str, list[float]]:
    """Seconds per pass of each contender, ``repeats`` rounds of one pass each, interleaved.

    Rounds alternate the contenders (ours, PyG, GRU, ours, ...), so load from other processes
    on a shared machine falls on all of them alike and per-round ratios stay comparable. A
    first, untimed round warms up.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            resets[name]()
            start = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def bench_batch_size(events: Events, batch_size: int, num_nodes: int, memory_dim: int,
                     time_dim: int, repeats: int) -> dict[str, float]:
    """Events/s of ours, PyG and the GRU limit at one batch size."""
    from torch_geometric.nn.models.tgn import IdentityMessage, LastAggregator, TGNMemory

    src, dst, t, msg = events
    msg_dim = msg.size(1)
    slices = [slice(i, i + batch_size) for i in range(0, src.numel(), batch_size)]
    ours = Memory(num_nodes, memory_dim, msg_dim, TimeEncoder(time_dim)).eval()
    t64 = t.double()
    pyg = TGNMemory(num_nodes, msg_dim, memory_dim, time_dim,
                    IdentityMessage(msg_dim, memory_dim, time_dim), LastAggregator())
    pyg.eval()  # PyG's TGNMemory.train() returns None, so no chaining
    gru = torch.nn.GRUCell(gru_input_dim(memory_dim, time_dim, msg_dim), memory_dim)
    gru_in = [torch.randn(2 * (min(s.stop, src.numel()) - s.start), gru.input_size)
              for s in slices]  # two node updates per event
    hidden = [torch.randn(x.size(0), memory_dim) for x in gru_in]

    def run_ours() -> None:
        for s in slices:
            ours.update_state(src[s], dst[s], t64[s], msg[s])

    def run_pyg() -> None:
        for s in slices:
            pyg.update_state(src[s], dst[s], t[s], msg[s])

    def run_gru() -> None:
        for x, h in zip(gru_in, hidden, strict=True):
            gru(x, h)

    with torch.no_grad():
        seconds = _interleaved_seconds(
            {"ours": run_ours, "pyg": run_pyg, "gru_limit": run_gru},
            {"ours": ours.reset_state, "pyg": pyg.reset_state, "gru_limit": lambda: None},
            repeats)
    events = src.numel()
    rate = {k: events / statistics.median(v) for k, v in seconds.items()}
    # ratios per round (same load), then the median: robust to load that shifts between rounds
    vs_pyg = statistics.median(p / o for o, p in zip(seconds["ours"], seconds["pyg"], strict=True))
    of_gru = statistics.median(g / o for o, g in zip(seconds["ours"], seconds["gru_limit"],
                                                     strict=True))
    return {"events_per_s": rate["ours"], "pyg_events_per_s": rate["pyg"],
            "gru_limit_events_per_s": rate["gru_limit"],
            "speedup_vs_pyg": vs_pyg, "fraction_of_gru_limit": of_gru,
            "rounds": {k: [round(events / x, 1) for x in v] for k, v in seconds.items()}}


def bench_memory(num_nodes: int = 10_000, memory_dim: int = 100, time_dim: int = 100,
                 msg_dim: int = 2, num_events: int = 20_000, batch_sizes: tuple[int, ...] = (
                     2000, 200), repeats: int = 5, threads: int = 2,
                 seed: int = 0) -> dict[str, object]:
    """The ``bench memory`` report: headline figures at the first batch size, then each size."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    events = random_events(num_events, num_nodes, msg_dim, seed)
    per_size = {b: bench_batch_size(events, b, num_nodes, memory_dim, time_dim, repeats)
                for b in batch_sizes}
    headline = per_size[batch_sizes[0]]
    return {**headline, "batch_size": batch_sizes[0],
            **{f"batch_{b}": v for b, v in per_size.items()},
            "config": {"num_nodes": num_nodes, "memory_dim": memory_dim, "time_dim": time_dim,
                       "msg_dim": msg_dim, "num_events": num_events, "repeats": repeats,
                       "threads": threads, "seed": seed, "torch": torch.__version__}}
