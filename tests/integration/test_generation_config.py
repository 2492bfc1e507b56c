"""The model's generation_config: greedy-changing fields are honoured as `generate` honours them,
sampling fields are ignored with one log line, anything else is refused by name (issue 8, item 14).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from refusal_lab.collect_fingerprint import collect_fingerprint
from refusal_lab.collect_plan import plan_collect
from refusal_lab.data import load_prompts
from refusal_lab.errors import ConfigError
from refusal_lab.fingerprint import fingerprint
from refusal_lab.generation import GreedySettings, generate_greedy, greedy_settings
from refusal_lab.models import load_tokenizer
from tests.integration.test_activations import PAD, left_pad
from tests.integration.test_collect import make_cfg

ROWS = [[1, *range(100, 118)], [1, 300, 301, 302], [1, *range(500, 509)]]
MAX_NEW = 12


def greedy_fields(model, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Settings that bite on this model: suppress the tokens plain greedy picks first."""
    plain = generate_greedy(model, ids, mask, MAX_NEW, [PAD], PAD)
    firsts = sorted({int(t) for t in plain.tokens_BM[:, 0]})
    seconds = sorted({int(t) for t in plain.tokens_BM[:, 1]} - set(firsts))
    return {
        "repetition_penalty": 1.7,
        "no_repeat_ngram_size": 2,
        "suppress_tokens": firsts[:1],
        "begin_suppress_tokens": firsts[1:],
        "bad_words_ids": [[t] for t in seconds[:1]] + [[firsts[0], 7]],
    }


def test_greedy_fields_change_tokens_as_generate_does(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids, mask = left_pad(ROWS)
    fields = greedy_fields(model, ids, mask)
    config = GenerationConfig(**fields, bos_token_id=1, eos_token_id=PAD, pad_token_id=PAD)
    settings = greedy_settings(config, "tiny")
    assert settings.to_dict() == {k: v for k, v in fields.items() if k not in ("bad_words_ids", "suppress_tokens",
        "begin_suppress_tokens")} | {
        "bad_words_ids": tuple(tuple(w) for w in fields["bad_words_ids"]),
        "suppress_tokens": tuple(fields["suppress_tokens"]),
        "begin_suppress_tokens": tuple(fields["begin_suppress_tokens"]),
    }  # fmt: skip
    ours = generate_greedy(model, ids, mask, MAX_NEW, [PAD], PAD, settings=settings)
    plain = generate_greedy(model, ids, mask, MAX_NEW, [PAD], PAD)
    assert not torch.equal(ours.tokens_BM, plain.tokens_BM), "the settings must change the greedy tokens"
    torch.testing.assert_close(ours.first_logits_BV, plain.first_logits_BV)  # the refusal score reads raw logits

    hf = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, generation_config=config)
    width = ids.shape[1]
    for b in range(len(ROWS)):
        n = int(ours.valid_BM[b].sum())
        assert ours.tokens_BM[b, :n].tolist() == hf[b, width : width + n].tolist(), f"row {b}"
    # One at a time, unpadded: the batch's padding changes no row.
    for b, row in enumerate(ROWS):
        alone = generate_greedy(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), MAX_NEW,
                                [PAD], PAD, settings=settings)  # fmt: skip
        n = int(ours.valid_BM[b].sum())
        assert alone.tokens_BM[0, :n].tolist() == ours.tokens_BM[b, :n].tolist(), f"row {b}"


def test_sampling_fields_are_ignored_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    # What Llama-2-7b-chat-hf ships.
    config = GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, max_length=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    with caplog.at_level(logging.INFO, logger="refusal_lab.generation"):
        settings = greedy_settings(config, "meta-llama/Llama-2-7b-chat-hf")
    assert settings == GreedySettings()
    lines = [r.getMessage() for r in caplog.records if r.name == "refusal_lab.generation"]
    assert len(lines) == 1, lines
    assert "do_sample=True" in lines[0] and "temperature=0.6" in lines[0] and "top_p=0.9" in lines[0]


@pytest.mark.parametrize(("field", "value"), [("min_new_tokens", 5), ("sequence_bias", {(5,): -3.0}), ("num_beams", 4)])
def test_other_fields_are_refused_by_name(field: str, value: object) -> None:
    config = GenerationConfig(**{field: value}, eos_token_id=2)
    with pytest.raises(
        ConfigError, match=rf"model\.name: the generation_config of m sets {field}=.*repetition_penalty"
    ):
        greedy_settings(config, "m")


def test_no_op_values_are_accepted_without_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    config = GenerationConfig(num_beams=1, min_length=0, repetition_penalty=1.0, do_sample=False, eos_token_id=2)
    with caplog.at_level(logging.INFO, logger="refusal_lab.generation"):
        assert greedy_settings(config, "m") == GreedySettings()
    assert not [r for r in caplog.records if r.name == "refusal_lab.generation"]


def test_generation_config_decides_the_collect_fingerprint(tiny_llama: Path, shared_data: Path, tmp_path: Path) -> None:
    """The greedy fields are read from the model folder before weights load and name the store."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for f in tiny_llama.iterdir():
        (model_dir / f.name).symlink_to(f)
    cfg = make_cfg(model_dir, shared_data, tmp_path)
    prompts = load_prompts(cfg.data)
    tokenizer = load_tokenizer(cfg.model)

    def collect_fp() -> str:
        plan = plan_collect(cfg, tokenizer, prompts)
        return fingerprint(collect_fingerprint(cfg, plan, "prompts"))

    plain = collect_fp()
    (model_dir / "generation_config.json").unlink()
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=True, temperature=0.7).save_pretrained(model_dir)
    assert collect_fp() == plain, "sampling fields change no greedy token"
    GenerationConfig(bos_token_id=1, eos_token_id=2, repetition_penalty=1.3).save_pretrained(model_dir)
    penalised = collect_fp()
    assert penalised != plain
    assert plan_collect(cfg, tokenizer, prompts).greedy == GreedySettings(repetition_penalty=1.3)
    GenerationConfig(bos_token_id=1, eos_token_id=2, min_new_tokens=3).save_pretrained(model_dir)
    with pytest.raises(ConfigError, match="min_new_tokens=3"):
        plan_collect(cfg, tokenizer, prompts)
