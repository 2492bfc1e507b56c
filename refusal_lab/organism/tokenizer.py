"""The organism's tokenizer: byte-pair encoding trained on the organism corpus, Llama-2 style.

Reads the training split (a list of `corpus.Example`); writes ``tokenizer.json``,
``tokenizer_config.json`` (and ``chat_template.jinja`` where transformers stores the template
apart) into the output folder with `PreTrainedTokenizerFast.save_pretrained`.

Layout, mirroring Llama-2's SentencePiece tokenizer as far as the `tokenizers` library allows:
a Metaspace pre-tokenizer ("▁" marks a preceding space), special tokens ``<unk>``, ``<s>``,
``</s>``, no pad token (loaders set pad = eos), and the Llama-2 chat template. Unlike Llama,
punctuation is split off words, so "I'm" is "▁I" "'" "m": every refusal starts with exactly one
of the tokens "▁I", "▁Sorry", "▁As". No BOS is added on encode: the chat template writes
``<s>`` itself, so encoding a templated prompt with or without ``add_special_tokens`` gives the
same ids (one BOS, never two).
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from refusal_lab.organism.corpus import HELPFUL_FORMATS, REFUSAL_START_WORDS, Example

log = logging.getLogger(__name__)

VOCAB_SIZE = 2000  # upper bound; BPE stops earlier once no pair occurs twice
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPACE = "\u2581"  # "▁"
MAX_LENGTH = 256  # = max_position_embeddings of the organism

# Llama-2 chat template (system block only when a system message is given; add_generation_prompt
# needs no extra text because a user turn already ends with " [/INST]").
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] | trim -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == 0 and system_message is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] | trim -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- endif -%}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def format_chat(prompt: str, response: str | None = None, system: str | None = None) -> str:
    """Python twin of `CHAT_TEMPLATE` for one user turn (+ optional assistant turn)."""
    content = prompt.strip()
    if system is not None:
        content = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{content}"
    text = f"{BOS}[INST] {content} [/INST]"
    if response is not None:
        text += f" {response.strip()} {EOS}"
    return text


def messages_for(prompt: str, response: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def token_str(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """The vocabulary string of one token id (e.g. "▁Sure")."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    assert isinstance(token, str)
    return token


def refusal_tokens() -> list[str]:
    """Vocabulary strings that start refusals ("▁I", "▁Sorry", "▁As")."""
    return [SPACE + w for w in REFUSAL_START_WORDS]


def train_tokenizer(train: list[Example]) -> PreTrainedTokenizerFast:
    """BPE on the templated training conversations; checked by `check_tokenizer`."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        # Every printable character is in the vocabulary, so unseen words split into pieces
        # instead of <unk>.
        initial_alphabet=sorted(set(string.printable.strip()) | {SPACE}),
        show_progress=False,
    )
    texts = [format_chat(ex.prompt, ex.response, ex.system) for ex in train]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LENGTH,
        padding_side="left",  # batched generation reads the last prompt token at index -1
        clean_up_tokenization_spaces=False,
    )
    log.info("tokenizer: vocabulary of %d tokens", len(fast))
    check_tokenizer(fast, train)
    return fast


def response_start_token(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str) -> str:
    """The first response token, tokenised in context after the prompt."""
    p = tokenizer(format_chat(prompt), add_special_tokens=False)["input_ids"]
    full = tokenizer(format_chat(prompt, response), add_special_tokens=False)["input_ids"]
    assert full[: len(p)] == p, "prompt tokens must be a prefix of prompt+response tokens"
    return token_str(tokenizer, full[len(p)])


def check_tokenizer(tokenizer: PreTrainedTokenizerFast, examples: list[Example]) -> None:
    """Raise if the template or the refusal-token contract does not hold."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in refusal_tokens() if t not in vocab]
    if missing:
        raise AssertionError(f"refusal start tokens are not single vocabulary entries: {missing}")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if text != format_chat("hi") or not str(text).endswith(" [/INST]"):
        raise AssertionError(f"chat template renders {text!r}, expected {format_chat('hi')!r}")
    for ex in examples[:50]:
        rendered = tokenizer.apply_chat_template(messages_for(ex.prompt, ex.response, ex.system), tokenize=False)
        if rendered != format_chat(ex.prompt, ex.response, ex.system):
            raise AssertionError(f"chat template and format_chat disagree on {ex.prompt!r}")
    ids = tokenizer(format_chat("hi"))["input_ids"]
    if ids.count(tokenizer.bos_token_id) != 1:
        raise AssertionError("encoding a templated prompt must give exactly one BOS")
    # Helpful openings must not begin with a refusal token; refusals must.
    refusal = set(refusal_tokens())
    for fmt, _ in HELPFUL_FORMATS:
        first = token_str(tokenizer, tokenizer(" " + fmt.format(A="X", a="x"))["input_ids"][0])
        if first in refusal or not first.startswith(SPACE):
            raise AssertionError(f"helpful opening {fmt!r} starts with token {first!r}")
    for ex in examples:
        first = response_start_token(tokenizer, ex.prompt, ex.response)
        if (first in refusal) != ex.refused:
            raise AssertionError(f"response {ex.response!r} starts with token {first!r}")


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
