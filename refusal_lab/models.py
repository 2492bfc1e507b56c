"""Load a HF causal LM and its tokenizer, and turn prompts into chat-formatted token ids.

Reads: a hub id (through the HF cache, honouring `cache_dir`, `revision`, offline flags) or a
local folder; `organism` resolves to the tiny chat model shipped in `refusal_lab/organism/assets`;
`package:<module>` to an installed package's folder; with `model.gguf_file`, a GGUF checkpoint
(refusal_lab.gguf_source), whose tokenizer and chat template come from the file. Writes nothing.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab.config import EMBEDDED_MODEL, ModelConfig
from refusal_lab.devices import resolve_device
from refusal_lab.errors import ConfigError
from refusal_lab.gguf_source import PACKAGE_PREFIX, check_gguf, gguf_path, package_dir
from refusal_lab.hooks import decoder_layers

log = logging.getLogger(__name__)

ORGANISM_DIR = Path(__file__).resolve().parent / "organism" / "assets"
"""The embedded model organism (config.json, model.safetensors, tokenizer files)."""

_PLACEHOLDER = "\x00PROMPT\x00"


def _named_path(cfg: ModelConfig) -> str:
    if cfg.name == EMBEDDED_MODEL:
        return str(ORGANISM_DIR)
    return str(package_dir(cfg.name)) if cfg.name.startswith(PACKAGE_PREFIX) else cfg.name


def gguf_source(cfg: ModelConfig) -> Path | None:
    """The GGUF file `model.gguf_file` names (within the `model.name` folder, or a path); None without one."""
    return gguf_path(_named_path(cfg), cfg.gguf_file) if cfg.gguf_file else None


def resolve_model_path(cfg: ModelConfig) -> str:
    """`organism` -> the shipped folder; `package:<module>` -> that package's folder; with a GGUF file, the file's
    folder; anything else is passed to from_pretrained as is."""
    gguf = gguf_source(cfg)
    return str(gguf.parent) if gguf else _named_path(cfg)


def source_kwargs(cfg: ModelConfig) -> dict:
    """Extra from_pretrained arguments of the source: `gguf_file` (checked first: packages, file, architecture)."""
    gguf = gguf_source(cfg)
    if gguf is None:
        return {}
    check_gguf(gguf)
    return {"gguf_file": gguf.name}


def _offline(cfg: ModelConfig) -> bool:
    return cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (so the last prompt token is at index -1) and a pad token."""
    path = resolve_model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path,
            revision=cfg.revision,
            cache_dir=cfg.cache_dir,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=_offline(cfg),
            **source_kwargs(cfg),
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.name: cannot load the tokenizer of {cfg.name!r} ({err.__class__.__name__}: {err}). "
            "Give a local folder with tokenizer files, or a hub id that is in the HF cache "
            f"(cache_dir={cfg.cache_dir!r}, offline={_offline(cfg)})."
        ) from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Llama-2 and Mistral ship without a pad token; padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ConfigError(f"model.name: {cfg.name!r} has no chat template; refusal_lab studies chat models")
    _keep_sentencepiece_prefix(tokenizer)
    return tokenizer


def _keep_sentencepiece_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give text after a special token SentencePiece's dummy prefix again, as Meta's and Mistral's reference code
    (and the HF tokenizer.json of Llama-2 / Mistral v0.1) do: `<s>[INST]` is `<s> ▁[ INST ]`.

    transformers 5 rebuilds these tokenizers in code from the vocabulary, and with `legacy: false` in
    tokenizer_config.json as Metaspace(prepend_scheme="first"), which drops that prefix after `<s>`
    (`<s> [ INST ]`, never seen in training). Tokenizers loaded from their own tokenizer.json (the organism's)
    have no `legacy` setting and are left alone.
    """
    from tokenizers import pre_tokenizers

    legacy = getattr(tokenizer, "legacy", None)
    if legacy is None:
        legacy = tokenizer.init_kwargs.get("legacy")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if legacy is not False or backend is None:
        return
    pre = backend.pre_tokenizer
    # A Sequence iterates through __getitem__ (no __iter__ in its stubs).
    inner = list(pre) if isinstance(pre, pre_tokenizers.Sequence) else [pre]  # pyright: ignore[reportArgumentType]
    if len(inner) == 1 and isinstance(inner[0], pre_tokenizers.Metaspace) and inner[0].prepend_scheme == "first":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=inner[0].split)
        log.info("tokenizer: legacy=false Metaspace tokenizer set to SentencePiece's prefix after special tokens")


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    """The model in eval mode on `cfg.device` (or spread by `device_map`)."""
    path = resolve_model_path(cfg)
    dtype = getattr(torch, cfg.torch_dtype.value)
    kwargs: dict = dict(
        revision=cfg.revision,
        cache_dir=cfg.cache_dir,
        trust_remote_code=cfg.trust_remote_code,
        local_files_only=_offline(cfg),
        dtype=dtype,
        **source_kwargs(cfg),
    )
    if cfg.device_map is not None:
        kwargs["device_map"] = cfg.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name: cannot load {cfg.name!r} ({err.__class__.__name__}: {err})") from err
    if cfg.gguf_file and cfg.device_map is None:
        # transformers keeps a GGUF-loaded model marked as quantised and refuses to save_pretrained it (the edit
        # stage saves its edited checkpoint that way): the stages get the same weights in a plain model.
        model = plain_copy(model)
    if cfg.device_map is None:
        torch.nn.Module.to(model, resolve_device(cfg.device, "model.device"))  # HF types `.to` too narrowly for pyright
    model.eval()
    if cfg.gguf_file:
        # GGUF tensors are dequantised on load; the dtype they end up in is what every stage computes in.
        log.info("model: %s dequantised from GGUF to %s", cfg.gguf_file, next(model.parameters()).dtype)
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise ConfigError(
            f"model.name: {cfg.name!r} ({type(model).__name__}) has no `model.model.layers`; "
            "refusal_lab supports decoder-only models laid out like Llama/Mistral"
        )
    return model


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model of the same class and config without GGUF's `quantization_config`:
    transformers' `save_pretrained` refuses a GGUF-loaded model, the copy saves and reloads as safetensors."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(model)(config)
    torch.nn.Module.to(plain, model.dtype)  # HF types `.to` too narrowly for pyright
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def n_layers(model: PreTrainedModel) -> int:
    return len(decoder_layers(model))


def input_device(model: PreTrainedModel) -> torch.device:
    weight = model.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight.device


@dataclass(frozen=True)
class ChatFormat:
    """How a user message is wrapped: the text before and after it, and the token count after it."""

    prefix: str
    suffix: str
    n_post_instruction_tokens: int


def _messages(cfg: ModelConfig, prompt: str, system_inline: bool) -> list[dict[str, str]]:
    if cfg.system_prompt is None:
        return [{"role": "user", "content": prompt}]
    if system_inline:
        return [{"role": "user", "content": f"{cfg.system_prompt}\n\n{prompt}"}]
    return [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": prompt}]


def chat_format(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[ChatFormat, bool]:
    """Find the template's text around the user message and whether the system prompt is inlined.

    Templates without a system role (Mistral-Instruct v0.1) raise on one; then the system prompt
    is prepended to the user message, as Mistral's own docs do.
    """
    system_inline = False
    try:
        text = tokenizer.apply_chat_template(
            _messages(cfg, _PLACEHOLDER, False), tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja raises TemplateError subclasses with model-specific messages
        if cfg.system_prompt is None:
            raise
        system_inline = True
        text = tokenizer.apply_chat_template(
            _messages(cfg, _PLACEHOLDER, True), tokenize=False, add_generation_prompt=True
        )
    assert isinstance(text, str) and _PLACEHOLDER in text
    prefix, suffix = text.split(_PLACEHOLDER)
    # The post-instruction tokens are the template tokens after the user's text (e.g. " [/INST]"),
    # where refusal directions are read (Arditi et al.). Count them in context: tokenise a real
    # prompt with and without the suffix.
    probe = "Hello there"
    with_suffix = tokenizer(prefix + probe + suffix, add_special_tokens=False)["input_ids"]
    without = tokenizer(prefix + probe, add_special_tokens=False)["input_ids"]
    n_post = len(with_suffix) - len(without)
    if with_suffix[: len(without)] != without or n_post <= 0:
        # Tokenisation merged across the boundary; count the suffix on its own instead.
        n_post = max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))
    return ChatFormat(prefix, suffix, n_post), system_inline


def format_prompts(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[str]:
    """Each prompt wrapped by the model's chat template (with the generation prompt)."""
    _, system_inline = chat_format(cfg, tokenizer)
    out: list[str] = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            _messages(cfg, prompt, system_inline), tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str)
        out.append(text)
    return out


def encode_prompts(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_prompt_tokens: int
) -> list[list[int]]:
    """Token ids of each chat-formatted prompt (the template already holds BOS).

    A prompt longer than `max_prompt_tokens` is an error rather than silently truncated:
    truncation would cut the post-instruction tokens that the study reads.
    """
    texts = format_prompts(cfg, tokenizer, prompts)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    too_long = [(i, len(x)) for i, x in enumerate(ids) if len(x) > max_prompt_tokens]
    if too_long:
        i, n = too_long[0]
        raise ConfigError(
            f"inference.max_prompt_tokens: {len(too_long)} prompts exceed {max_prompt_tokens} tokens "
            f"(e.g. prompt {i} has {n}); raise the limit or filter the data"
        )
    return [list(x) for x in ids]
