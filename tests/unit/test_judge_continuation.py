"""refusal_lab.judge.continuation: responses continued past the captured tokens equal one longer greedy run."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from refusal_lab.generation import generate_greedy
from refusal_lab.judge.continuation import continue_responses

PAD, EOS = 0, 2


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def greedy(model, rows: list[list[int]], n: int, eos: list[int]) -> list[list[int]]:
    ids, mask = padded(rows)
    with torch.no_grad():
        gen = generate_greedy(model, ids, mask, n, eos, PAD)
    return [gen.tokens_BM[i, : int(gen.valid_BM[i].sum())].tolist() for i in range(len(rows))]


def test_continued_responses_equal_one_long_greedy_run():
    model = tiny_model()
    prompts = [[1, 5, 9, 13, 7], [1, 22, 3], [1, 40, 41, 42, 43, 44, 45]]
    long = greedy(model, prompts, 12, [EOS])
    ids, mask = padded(prompts)
    with torch.no_grad():
        short = generate_greedy(model, ids, mask, 4, [EOS], PAD)
    got = continue_responses(model, prompts, short.tokens_BM, short.valid_BM, 12, [EOS], PAD, torch.device("cpu"))
    assert got == long
    assert all(len(r) == 12 for r in got)  # a random model never says EOS: every row ran to the budget


def test_rows_that_ended_are_not_continued_and_no_budget_means_no_change():
    model = tiny_model()
    prompts = [[1, 5, 9, 13, 7], [1, 22, 3]]
    first = greedy(model, prompts, 3, [EOS])
    eos = [first[0][1]]  # make row 0's second token its EOS: it ends after two tokens
    ids, mask = padded(prompts)
    with torch.no_grad():
        short = generate_greedy(model, ids, mask, 3, eos, PAD)
    got = continue_responses(model, prompts, short.tokens_BM, short.valid_BM, 10, eos, PAD, torch.device("cpu"))
    assert got[0] == first[0][:2]
    assert len(got[1]) > 3 or got[1][-1] in eos
    same = continue_responses(model, prompts, short.tokens_BM, short.valid_BM, 3, eos, PAD, torch.device("cpu"))
    assert same[0] == first[0][:2] and len(same[1]) == 3
