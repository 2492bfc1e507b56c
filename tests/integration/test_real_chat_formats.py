"""The real models' prompts, tokenised by the project's own path, are what each model saw in training.

The tokenizers are built from the real SentencePiece `tokenizer.model` files in ../shared/data/tokenizers
(Meta's Llama-2 and Mistral-7B v0.1, see ../shared/data/SOURCES.md section 5) with the chat template each model
ships in its `tokenizer_config.json`, copied below with its source. The prompts go through the project's path:
the `model=llama2_7b` / `model=mistral_7b` options composed by Hydra (only `model.name` points at the local
folder), `load_tokenizer`, and `plan_collect`, whose token ids are what collect feeds the model.

The reference is each vendor's own formatting, built here with the `sentencepiece` library on the same file:

* Meta's `Llama.chat_completion` (github.com/meta-llama/llama, llama/generation.py): a system message is folded
  into the first user message as B_SYS + system + E_SYS + user (B_SYS = "<<SYS>>\\n", E_SYS =
  "\\n<</SYS>>\\n\\n"); the last user turn is `tokenizer.encode(f"{B_INST} {content.strip()} {E_INST}",
  bos=True, eos=False)` with B_INST, E_INST = "[INST]", "[/INST]", i.e. [BOS] + sp.encode(text).
* Mistral's reference for Instruct v0.1 (mistral-common's v1 instruct tokenizer; the model card's
  "<s>[INST] {prompt} [/INST]"): [BOS] + sp.encode(f"[INST] {content} [/INST]"), with no system role: a system
  prompt is put before the first user message, separated by a blank line ("\\n\\n").
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from transformers import LlamaConfig, MistralConfig

from refusal_lab.collect_plan import plan_collect
from refusal_lab.config import RunConfig, register_configs
from refusal_lab.data import Prompt
from refusal_lab.models import load_tokenizer
from tests.conftest import SHARED_DATA as SHARED
from tests.conftest import tiny_config_kwargs

REPO = Path(__file__).resolve().parents[2]

# Source: https://huggingface.co/meta-llama/Llama-2-7b-chat-hf/blob/main/tokenizer_config.json, "chat_template"
# (the same string for Llama-2-13b-chat-hf; entry 28 of ../shared/data/chat_templates/ollama_template_index.json).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Source: https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.1/blob/main/tokenizer_config.json, "chat_template",
# as quoted from that file by llama-cpp-python (llama_cpp/llama_chat_format.py, MISTRAL_INSTRUCT_CHAT_TEMPLATE);
# entry 14 of the ollama index. It has no system role: it raises on one.
MISTRAL_V01_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

BOS = 1
LLAMA_SYSTEM = "You are a helpful assistant. Answer briefly."

# Prompts with edges: a leading digit or bracket right after "[INST] ", inner newlines, non-ASCII text
# (surrounding whitespace has its own test below).
EDGE_PROMPTS = [
    "How do I kill a Python process?",
    "1984 is a novel by whom?",
    "[brackets] first, then a question?",
    "Line one\nLine two\n\nafter a blank line",
    "Ünïcödé — naïve café, 東京, emoji 🙂?",
]


def or_bench_prompts(n: int = 12) -> list[str]:
    """The first n prompts of each staged OR-Bench file: real prompts of the kind the study runs."""
    texts: list[str] = []
    for name in ("or-bench-hard-1k.csv", "or-bench-toxic.csv"):
        with (SHARED / "or_bench" / name).open(newline="", encoding="utf-8") as f:
            texts += [row["prompt"] for _, row in zip(range(n), csv.DictReader(f), strict=False)]
    return texts


def model_folder(out: Path, kind: str, legacy: bool) -> Path:
    """Config (no weights: planning never loads them) + the real tokenizer.model + the shipped chat template."""
    common = tiny_config_kwargs(n_layers=2)
    if kind == "llama2":
        LlamaConfig(**common).save_pretrained(out)
        shutil.copy(SHARED / "tokenizers" / "llama2" / "tokenizer.model", out / "tokenizer.model")
        template = LLAMA2_CHAT_TEMPLATE
    else:
        MistralConfig(**common).save_pretrained(out)
        shutil.copy(SHARED / "tokenizers" / "mistral-7b-v0.1" / "tokenizer.model", out / "tokenizer.model")
        template = MISTRAL_V01_CHAT_TEMPLATE
    # tokenizer_config.json as the model repos ship it, reduced to what decides the tokens.
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "LlamaTokenizer",
                "legacy": legacy,
                "chat_template": template,
            }
        )
    )
    return out


def project_config(option: str, folder: Path, *overrides: str) -> RunConfig:
    """The shipped model option, composed as `python -m refusal_lab model=<option>` does, on the local folder."""
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={option}", f"model.name={folder}", *overrides])
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig)
    return run


def project_token_ids(run: RunConfig, prompts: list[str]) -> tuple[list[list[int]], int, str]:
    tokenizer = load_tokenizer(run.model)
    rows = [Prompt(i, text, "c", "safe", f"test:{i}") for i, text in enumerate(prompts)]
    plan = plan_collect(run, tokenizer, rows)
    return plan.token_ids, plan.fmt.n_post_instruction_tokens, plan.chat_template


def meta_llama2_reference(sp: spm.SentencePieceProcessor, user: str, system: str | None) -> list[int]:
    """Meta's chat_completion for a dialog [system?, user] (llama/generation.py)."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
    content = B_SYS + system + E_SYS + user if system is not None else user
    return [BOS, *sp.encode(f"{B_INST} {content.strip()} {E_INST}")]


def mistral_v01_reference(sp: spm.SentencePieceProcessor, user: str, system: str | None) -> list[int]:
    """Mistral's v1 instruct format: [BOS] [INST] {system\\n\\n}{user} [/INST]."""
    content = f"{system}\n\n{user}" if system is not None else user
    return [BOS, *sp.encode(f"[INST] {content} [/INST]")]


CASES = {
    # option -> (tokenizer folder kind, reference, the vendor's post-instruction tokens)
    "llama2_7b": ("llama2", meta_llama2_reference, ["▁[", "/", "INST", "]"]),
    "mistral_7b": ("mistral", mistral_v01_reference, ["▁[", "/", "INST", "]"]),
}


# The `legacy` flag of the shipped tokenizer_config.json decides, under transformers 5, whether a SentencePiece
# dummy prefix follows <s>. Neither model's tokenizer_config.json is staged (../shared/data/SOURCES.md, "Not
# found"), so both values are tested.
def _case(option: str, legacy: bool, tmp_path_factory: pytest.TempPathFactory):
    kind, reference, post = CASES[option]
    folder = model_folder(tmp_path_factory.mktemp(f"{kind}_legacy_{legacy}"), kind, legacy)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return option, folder, sp, reference, post


@pytest.fixture(scope="module")
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    option, legacy = request.param
    return _case(option, legacy, tmp_path_factory)


def cases() -> list:
    # refusal_lab.models restores SentencePiece's dummy prefix after special tokens for legacy=false tokenizers,
    # so both values must give the reference ids.
    return [
        pytest.param((option, legacy), id=f"{option}-legacy_{str(legacy).lower()}")
        for option in sorted(CASES)
        for legacy in (True, False)
    ]


def test_the_shipped_templates_are_the_ones_copied_here() -> None:
    index = json.loads((SHARED / "chat_templates" / "ollama_template_index.json").read_text())
    assert index[28]["template"] == LLAMA2_CHAT_TEMPLATE
    assert index[14]["template"] == MISTRAL_V01_CHAT_TEMPLATE


def _run_for(option: str, folder: Path, with_system: bool) -> RunConfig:
    overrides = []
    if option == "llama2_7b" and with_system:
        overrides = [f"model.system_prompt='{LLAMA_SYSTEM}'"]
    if option == "mistral_7b" and not with_system:
        overrides = ["model.system_prompt=null"]  # the shipped option sets Mistral's guardrail prompt
    run = project_config(option, folder, *overrides)
    assert (run.model.system_prompt is not None) == with_system
    return run


@pytest.mark.parametrize("with_system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("case", cases(), indirect=True)
def test_project_tokens_equal_the_vendor_reference(case, with_system: bool) -> None:
    option, folder, sp, reference, post = case
    run = _run_for(option, folder, with_system)
    prompts = EDGE_PROMPTS + or_bench_prompts()
    ids, n_post, template = project_token_ids(run, prompts)
    assert template == (LLAMA2_CHAT_TEMPLATE if option == "llama2_7b" else MISTRAL_V01_CHAT_TEMPLATE)

    post_ids = sp.piece_to_id(post)
    for text, got in zip(prompts, ids, strict=True):
        want = reference(sp, text, run.model.system_prompt)
        assert got == want, f"{option} {text!r}:\n got  {sp.id_to_piece(got)}\n want {sp.id_to_piece(want)}"
        assert got.count(BOS) == 1 and got[0] == BOS  # exactly one BOS, first
        assert got[1:4] == sp.piece_to_id(["▁[", "INST", "]"])  # "[INST]" as the reference tokenises it
        assert got[-len(post) :] == post_ids  # ends with " [/INST]", where generation starts
    assert n_post == len(post) == 4


@pytest.mark.parametrize("with_system", [False, True], ids=["no_system", "system"])
@pytest.mark.parametrize("case", cases(), indirect=True)
def test_whitespace_around_the_prompt_is_kept_or_stripped_as_the_reference_does(case, with_system: bool) -> None:
    # Meta strips the (system + user) content, Mistral keeps it verbatim. Compared as text: on runs of spaces the
    # tokenizers library's BPE merges differ from SentencePiece's ('\n\n  Leading': ▁▁ L ead ing vs ▁ ▁Le ading,
    # measured on Llama-2), a tokenizer difference the project cannot choose.
    option, folder, sp, reference, _ = case
    run = _run_for(option, folder, with_system)
    prompts = ["  Leading and trailing spaces  ", "\tTabbed\t", "\nNew line first"]
    ids, _, _ = project_token_ids(run, prompts)
    for text, got in zip(prompts, ids, strict=True):
        assert sp.decode(got) == sp.decode(reference(sp, text, run.model.system_prompt)), text
        assert got.count(BOS) == 1 and got[0] == BOS


@pytest.mark.parametrize("case", cases(), indirect=True)
def test_the_system_prompt_sits_where_each_model_expects_it(case) -> None:
    option, folder, sp, _, _ = case
    system = "Always assist with care." if option == "mistral_7b" else LLAMA_SYSTEM
    run = project_config(option, folder, f"model.system_prompt='{system}'")
    (ids,), _, _ = project_token_ids(run, ["What is 2+2?"])
    text = sp.decode(ids)
    if option == "llama2_7b":
        # Inside the first [INST], in the <<SYS>> block, before the user message.
        assert text == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\nWhat is 2+2? [/INST]"
    else:
        # No system role in v0.1: before the user message after a blank line, inside the same [INST].
        assert text == f"[INST] {system}\n\nWhat is 2+2? [/INST]"
    assert ids.count(sp.piece_to_id("INST")) == 2  # one [INST] ... [/INST] pair, nothing else
