"""Fixtures of the profiles tests: a tiny random-weight LLM, a chat-completions HTTP peer,
a hand-made dataset."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from streaming.dataset import write_dataset


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with a 512-token BPE tokenizer, saved as a model folder.

    Its weights are random: it tests plumbing (batching, stopping, parsing, fallback), not text.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Crowd segment: young family\nPersonal interests: baking, soups\n"
              "Preferred categories: Cheese, Soft Drinks\nFavored brands: M69 private label\n",
              "Household: age 45-54\nPurchases: 12 over 3 days\nTop categories: Fluid Milk"] * 20
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, pad_token_id=fast.pad_token_id,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedder():
    """The packaged all-MiniLM-L6-v2 facet embedder (loaded once)."""
    from profiles.embed import FacetEmbedder

    return FacetEmbedder()


def _grounded_answer(prompt: str) -> str:
    """A rule-based 'model': name the first listed category and brand of the prompt."""
    category = re.search(r"Categories: ([^,\n]+)", prompt)
    brand = re.search(r"Brands: ([^,\n]+)", prompt)
    return (f"Crowd segment: budget family shopper\nPersonal interests: home cooking\n"
            f"Preferred categories: {category.group(1) if category else 'x'}\n"
            f"Favored brands: {brand.group(1) if brand else 'x'}")


class ChatPeer:
    """A real HTTP server on loopback speaking the chat-completions shape.

    Attributes:
        script: Status codes to answer with, consumed one per request (then 200s).
        requests: JSON bodies received.
        delay: Seconds to wait before answering (to provoke client timeouts).
        answer: Function from the user message to the answer text.
    """

    def __init__(self) -> None:
        self.script: list[int] = []
        self.requests: list[dict] = []
        self.delay = 0.0
        self.answer = _grounded_answer
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                import time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                peer.requests.append(body)
                status = peer.script.pop(0) if peer.script else 200
                time.sleep(peer.delay)
                if status != 200 or self.path != "/v1/chat/completions":
                    self.send_response(status if status != 200 else 404)
                    self.end_headers()
                    return
                text = peer.answer(body["messages"][-1]["content"])
                reply = {"choices": [{"message": {"role": "assistant", "content": text}}],
                         "usage": {"completion_tokens": len(text.split())}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client timed out and left
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def chat_peer():
    """A started :class:`ChatPeer` (shut down after the test)."""
    peer = ChatPeer()
    yield peer
    peer.server.shutdown()
    peer.server.server_close()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hand-made dataset: 4 users, 5 items, 16 events at t = 0..15 days.

    u1 buys cheese (i1) and milk (i2); u2 buys cheese and soda (i3); u3 buys soda and chips (i4);
    u4 buys only bread (i5), which nobody else buys. The last event (u1 buys chips at day 15)
    must never appear in a context cut before it.
    """
    day = 86400.0
    rows = [("u1", "i1", 0), ("u1", "i2", 1), ("u2", "i1", 2), ("u2", "i3", 3), ("u3", "i3", 4),
            ("u3", "i4", 5), ("u1", "i1", 6), ("u2", "i3", 7), ("u3", "i4", 8), ("u4", "i5", 9),
            ("u1", "i2", 10), ("u2", "i1", 11), ("u3", "i3", 12), ("u4", "i5", 13),
            ("u1", "i1", 14), ("u1", "i4", 15)]
    events = pa.table({
        "event_id": [f"e{i}" for i in range(len(rows))], "user_id": [r[0] for r in rows],
        "item_id": [r[1] for r in rows], "ts": [r[2] * day for r in rows],
        "quantity": [1.0] * len(rows), "price": [1.0] * len(rows),
        "basket_id": [None] * len(rows), "store_id": [None] * len(rows)})
    items = pa.table({
        "item_id": ["i1", "i2", "i3", "i4", "i5"],
        "title": ["Cheddar", "Milk", "Cola", "Chips", "Bread"],
        "category": ["Grocery > Cheese > Cheddar", "Grocery > Fluid Milk > White Milk",
                     "Grocery > Soft Drinks > Cola", "Grocery > Bag Snacks > Potato Chips",
                     "Grocery > Bread > White Bread"],
        "brand": ["Private label (manufacturer 69)", "National brand (manufacturer 2)",
                  "National brand (manufacturer 7)", "National brand (manufacturer 7)",
                  "Private label (manufacturer 69)"],
        "price": [2.0, 1.0, 1.5, 2.5, 1.2]})
    users = pa.table({"user_id": ["u1"], "age": ["45-54"], "income": ["50-74K"],
                      "household_comp": ["2 Adults Kids"]})
    out = tmp_path_factory.mktemp("tiny_data")
    write_dataset(out, events, items, users, name="tiny")
    return out
