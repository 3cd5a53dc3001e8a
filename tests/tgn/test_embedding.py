"""The temporal attention against the textbook form: project every neighbour, then attend."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from tgn.embedding import TemporalAttention
from tgn.memory import Memory, TimeEncoder


def _textbook(att: TemporalAttention, memory: Memory, nodes, neighbor, dt, valid, degree):
    """Keys and values from ``[neighbour memory ‖ cos_time(Δt)]`` per pair, SDPA over them."""
    (b, k), h, e = neighbor.shape, att.heads, att.embed_dim
    own = memory.memory[nodes]
    query = att.query(torch.cat([own, att.time_enc(own.new_zeros(b))], 1)).view(b, h, 1, e // h)
    kv = att.key_value_memory(memory.memory[neighbor.clamp_min(0)])
    kv = kv + att.key_value_time(att.time_enc(dt))
    key, value = kv.view(b, k, 2, h, e // h).permute(2, 0, 3, 1, 4)
    empty = ~valid.any(1)
    mask = (valid | empty.unsqueeze(1)).view(b, 1, 1, k)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask).reshape(b, e)
    out = att.out(out) * (~empty).unsqueeze(1).float()
    return att.merge(torch.cat([out, own, torch.log1p(degree.float()).unsqueeze(1)], 1))


def test_attention_equals_projecting_every_neighbour():
    torch.manual_seed(0)
    encoder = TimeEncoder(8)
    memory = Memory(40, 12, 2, encoder, "last")
    memory.memory = torch.randn(40, 12)
    att = TemporalAttention(12, encoder, 16, 2)
    with torch.no_grad():  # give the value bias and the time weights a visible size
        att.key_value_memory.bias.normal_()
        att.key_value_time.weight.normal_()
    nodes = torch.arange(30)
    neighbor = torch.randint(-1, 40, (30, 5))
    valid = neighbor >= 0
    valid[:4] = False  # nodes without neighbours yet
    valid[4, 1:] = False  # one neighbour only
    dt = torch.rand(30, 5, dtype=torch.float64) * 1e6
    degree = torch.randint(0, 50, (30,))
    got = att(memory, nodes, neighbor, dt, valid, degree)
    want = _textbook(att, memory, nodes, neighbor, dt, valid, degree)
    assert got.shape == (30, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # gradients reach the same parameters with the same values
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in att.named_parameters()}
    att.zero_grad()
    _textbook(att, memory, nodes, neighbor, dt, valid, degree).sum().backward()
    for name, p in att.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
