"""Constrained decoding: forced headings, caps, no empty values, the end after four lines."""

from __future__ import annotations

import torch

from profiles.backends import TransformersBackend, drop_partial_items
from profiles.constrain import FacetLines, VocabClasses
from profiles.facets import parse_facets
from profiles.prompt import FACETS

# A hand-made 9-token vocabulary: 0 "a", 1 ",", 2 "\n", 3 <eos>, 4-6 the three later headings,
# 7 " " (blank), 8 "Two" (the first token of a placeholder of the format).
TOKENS = ["a", ",", "\n", "<eos>", "H2", "H3", "H4", " ", "Two"]
VOCAB = VocabClasses(
    newline=torch.tensor([t == "\n" for t in TOKENS]),
    comma=torch.tensor([t == "," for t in TOKENS]),
    value_start=torch.tensor([t in ("a", "Two") or t.startswith("H") for t in TOKENS]),
    special=torch.tensor([t == "<eos>" for t in TOKENS]),
    break_id=2, eos_id=3, headings=[[], [4], [5], [6]],
    copy_start=torch.tensor([t == "Two" for t in TOKENS]))


def _greedy(preference: list[str], caps: tuple[int, ...],
            steps: int = 40) -> tuple[str, FacetLines]:
    """Decode with a 'model' whose logits rank tokens by ``preference``, through the rules."""
    scores = torch.zeros(len(TOKENS))
    for rank, tok in enumerate(preference):
        scores[TOKENS.index(tok)] = len(TOKENS) - rank
    rules = FacetLines(VOCAB, start=1, batch=1, caps=caps, max_items=(0, 2, 2, 2))
    ids = torch.tensor([[0]])  # the prompt: one token
    for _ in range(steps):
        nxt = int(rules(ids, scores.clone()[None]).argmax())
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        if nxt == VOCAB.eos_id:
            break
    return " ".join(TOKENS[i] for i in ids[0, 1:].tolist()).replace("\n", "NL"), rules


def test_caps_force_line_breaks_headings_and_the_end():
    text, rules = _greedy(["a", ",", "\n"], caps=(2, 2, 2, 2))
    # the model would write "a" forever: every line is cut after 2 tokens, headings follow
    assert text == "a a NL H2 a a NL H3 a a NL H4 a a NL <eos>"
    assert rules.rows[0].capped == {0, 1, 2, 3}


def test_no_empty_value_no_early_end_and_no_third_item():
    text, rules = _greedy(["<eos>", "\n", "a", ","], caps=(5, 5, 5, 5))
    # <eos> is banned before the fourth line ends and a value cannot start with a line break
    assert text == "a NL H2 a NL H3 a NL H4 a NL <eos>"
    assert rules.rows[0].capped == set()
    text, rules = _greedy([",", "a", "\n"], caps=(3, 4, 4, 4))
    # free text (line 0) may hold commas; list lines get one comma (two items), then no more
    assert text == "a , , NL H2 a , a a NL H3 a , a a NL H4 a , a a NL <eos>"
    assert rules.rows[0].capped == {0, 1, 2, 3}


def test_a_value_never_starts_like_a_placeholder():
    text, _ = _greedy(["Two", "a", ","], caps=(2, 2, 2, 2))
    # the model would copy the placeholder: each value starts otherwise, "Two" only after
    assert text == "a Two NL H2 a Two NL H3 a Two NL H4 a Two NL <eos>"


def test_capped_list_lines_lose_their_half_item():
    text = "Crowd segment: young, busy\nPersonal interests: baking\nPreferred categories: " \
        "Cheese, Soft Dri\nFavored brands: M69 private label, M10"
    cut = drop_partial_items(text, {0, 1, 2, 3})
    assert cut.splitlines()[2:] == ["Preferred categories: Cheese",
                                    "Favored brands: M69 private label"]
    assert cut.splitlines()[:2] == text.splitlines()[:2]  # free text and single items stay


def test_random_weights_still_write_the_four_lines(tiny_llm):
    backend = TransformersBackend(tiny_llm, batch_size=3)
    prompts = [[{"role": "user", "content": "Categories: Cheese" + " and more" * i}]
               for i in range(3)]
    for sample in (False, True):
        for gen in backend.generate(prompts, sample=sample):
            facets = parse_facets(gen.text)
            assert facets is not None, gen.text
            headings = [line.split(":")[0] for line in gen.text.split("\n")]
            assert headings == list(FACETS)
            assert gen.new_tokens <= backend.vocab.max_tokens()
