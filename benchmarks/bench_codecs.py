"""Compression of stored activations: the store's codec against zstd, on real and random-weight models.

    python benchmarks/bench_codecs.py

Activations of every residual layer but the embeddings, stored as the collect stage stores them (float16, or the raw
bf16 bits), cut into 1024-row chunks and compressed one chunk at a time, single-threaded:
  organism   the shipped model organism (trained, float32, d_model 128) on the embedded prompts
  random     a random-init Llama (d_model 512, 8 layers) in bf16 on OR-Bench hard-1k prompts
Prints, per source and codec, stored/raw size as a ratio raw/stored, and encode and decode MB/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_collect import build, load_prompts  # noqa: E402

from refusal_lab.collect import left_pad  # noqa: E402
from refusal_lab.config import ModelConfig  # noqa: E402
from refusal_lab.data import embedded_prompts_path  # noqa: E402
from refusal_lab.models import encode_prompts  # noqa: E402
from refusal_lab.organism import ASSETS_DIR  # noqa: E402
from refusal_lab.store import ACTS_CODEC  # noqa: E402

CHUNK = 1024
CODECS = {
    "store: blosc lz4 bitshuffle": numcodecs.Blosc(
        ACTS_CODEC["cname"], ACTS_CODEC["clevel"], numcodecs.Blosc.BITSHUFFLE
    ),
    "zstd level 1": numcodecs.Zstd(level=1),
    "zstd level 3": numcodecs.Zstd(level=3),
}


@torch.inference_mode()
def residuals(model, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """residuals_1 .. residuals_{L-1} at every real token, [tokens, d_model], in the model's dtype.

    residuals_0 (the token embeddings) is left out: it repeats one row per vocabulary entry and
    compresses far better than any activation, which would flatter every codec.
    """
    out = []
    for i in range(0, len(rows), 16):
        ids, mask = left_pad(rows[i : i + 16], pad_id, torch.device("cpu"))
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.bool()
        out += [h[keep] for h in hidden[1:-1]]
    return torch.cat(out)


def organism_acts() -> torch.Tensor:
    import json

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR)
    model = AutoModelForCausalLM.from_pretrained(ASSETS_DIR, dtype=torch.float32).eval()
    texts = [json.loads(line)["prompt"] for line in embedded_prompts_path().read_text().splitlines() if line]
    rows = encode_prompts(ModelConfig(name="organism", activation_layers=["all"]), tokenizer, texts[:256], 4096)
    return residuals(model, rows, int(tokenizer.pad_token_id or 0))


def random_bf16_acts(tmp: Path) -> torch.Tensor:
    model, tokenizer = build("cpu-512", "cpu", torch.bfloat16, tmp)
    rows = [tokenizer(p.text)["input_ids"] for p in load_prompts(128)]
    return residuals(model, rows, tokenizer.pad_token_id)


def measure(values: np.ndarray) -> None:
    chunks = [np.ascontiguousarray(values[i : i + CHUNK]) for i in range(0, len(values) - CHUNK + 1, CHUNK)]
    raw = sum(c.nbytes for c in chunks)
    for name, codec in CODECS.items():
        codec.encode(chunks[0])
        t0 = time.perf_counter()
        encoded = [codec.encode(c) for c in chunks]
        t1 = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        t2 = time.perf_counter()
        print(
            f"    {name:28s} ratio {raw / sum(len(e) for e in encoded):.3f}x  "
            f"encode {raw / (t1 - t0) / 1e6:6.0f} MB/s  decode {raw / (t2 - t1) / 1e6:6.0f} MB/s"
        )


def main() -> None:
    import tempfile

    numcodecs.blosc.set_nthreads(1)
    organism = organism_acts()
    print(f"organism residuals, float32 model stored as float16 ({len(organism)} token-layer rows):")
    measure(organism.half().numpy())
    with tempfile.TemporaryDirectory() as tmp:
        acts = random_bf16_acts(Path(tmp))
    print(f"random-init Llama d_model 512 in bf16 ({len(acts)} token-layer rows), stored as float16:")
    measure(acts.half().numpy())
    print("  ... stored raw (bf16 bits):")
    measure(acts.view(torch.uint16).numpy())


if __name__ == "__main__":
    main()
