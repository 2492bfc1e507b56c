"""Sharded collect: N store parts written by N processes against one process, and the paper estimate at scale.

    python benchmarks/bench_shards.py                  # CPU: organism, 96 prompts, 1 process vs 2 shard processes
    python benchmarks/bench_shards.py --shards 4 --prompts 256
    python benchmarks/bench_shards.py --paper          # the README table: Llama-2-7B x 32 layers x OR-Bench-80k

Measured: `python -m refusal_lab stages=[collect]` once unsharded and once as N concurrent shard
processes (`inference.shards=N inference.shard=i`), each process on one thread
(OMP_NUM_THREADS=1, as one SLURM task per core would be), same prompts and batch size. Printed
side by side: wall time including start-up, the collect loop's own seconds (the slowest part
for the shards), stored tokens and bytes on disk, and the ratios. The joined parts are checked
to hold every sample once.

--paper prints the estimate for Llama-2-7B (d_model 4096, 32 residual hook points, float16) over
OR-Bench-80k (80,359 prompts) for each positions policy: bytes written, the time on one node
with a 0.7 GB/s disk, and with N shards on N nodes, with every assumption printed. Prompt
lengths are measured with the real Llama-2 tokenizer and chat template on or-bench-hard-1k
(80k's rows are generated the same way; no 80k copy is available here: ../shared/data/SOURCES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# --- the paper estimate's assumptions (printed with the table) ---
N_PROMPTS_80K = 80_359
D_MODEL = 4096
HOOKS = 32
BYTES_PER_VALUE = 2  # float16
TOKEN_ROW = 13  # sample_id, position, phase, token_id
COMPRESSION = 1.4  # blosc lz4 bitshuffle on activations (README, benchmarks/bench_codecs.py)
MAX_NEW_TOKENS = 20  # conf/inference/default.yaml
DISK_BPS = 0.7e9
GPU_PREFILL_TOKENS_S = 20_000.0
"""Assumed Llama-2-7B bf16 rate on one A100/H100 for prompt tokens with capture (until measured with
`python benchmarks/bench_collect.py --arch llama2-7b --device cuda --dtype bfloat16 --prompts 512 --batch 64`)."""
GPU_DECODE_SEQS_S = 250.0
"""Assumed sequences per second for 20 greedy tokens each at batch 64 (decode is weight-bandwidth bound)."""
SHARED_FS_BPS = 5e9
"""Assumed aggregate write bandwidth of a shared parallel file system, when the parts go there."""


def run_collect(tmp: Path, name: str, args: argparse.Namespace, shards: int) -> tuple[float, list[Path]]:
    """Wall seconds of `shards` concurrent collect processes (1 = unsharded), and their store (or part) paths."""
    common = [
        sys.executable, "-m", "refusal_lab", "stages=[collect]", "tracking=disabled",
        f"data.limit={args.prompts}", f"inference.batch_size={args.batch}",
        f"inference.max_new_tokens={args.max_new_tokens}", f"artifacts_dir={tmp / name}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    jobs = (
        [[*common, f"hydra.run.dir={tmp / name / 'run'}"]]
        if shards == 1
        else [
            [*common, f"inference.shards={shards}", f"inference.shard={i}", f"hydra.run.dir={tmp / name / f'run{i}'}"]
            for i in range(shards)
        ]
    )
    start = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for cmd in jobs
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"collect failed: {err.decode()[-2000:]}")
    wall = time.perf_counter() - start
    runs = sorted((tmp / name).glob("run*/summary.json"))
    return wall, [Path(json.loads(p.read_text())["collect"]["store"]) for p in runs]


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(args: argparse.Namespace) -> None:
    from refusal_lab.store import ActivationStore

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for repeat in range(args.repeats):
            for shards in (1, args.shards):
                wall, stores = run_collect(tmp, f"r{repeat}-n{shards}", args, shards)
                opened = [ActivationStore.open(p) for p in stores]
                loop = max(s.attrs["collect_stats"]["seconds"] for s in opened)
                rows.append({"shards": shards, "wall": wall, "loop": loop, "tokens": sum(s.n_tokens for s in opened),
                             "bytes": sum(disk_bytes(p) for p in stores)})  # fmt: skip
                if shards > 1:
                    joined = ActivationStore.open(stores[0].parent)
                    assert sorted(joined.samples()["sample_id"].tolist()) == list(range(args.prompts))
    print(f"collect, organism, {args.prompts} prompts, batch {args.batch}, {args.max_new_tokens} new tokens, "
          f"1 thread per process, median of {args.repeats}")  # fmt: skip
    print(f"{'processes':>9} {'wall s':>8} {'loop s':>8} {'tokens':>8} {'MB':>7}")
    med: dict[int, dict[str, float]] = {}
    for shards in (1, args.shards):
        mine = [r for r in rows if r["shards"] == shards]
        med[shards] = {k: statistics.median(r[k] for r in mine) for k in ("wall", "loop", "tokens", "bytes")}
        m = med[shards]
        print(f"{shards:>9} {m['wall']:>8.1f} {m['loop']:>8.1f} {m['tokens']:>8.0f} {m['bytes'] / 1e6:>7.2f}")
    one, many = med[1], med[args.shards]
    ratio_wall, ratio_loop = one["wall"] / many["wall"], one["loop"] / many["loop"]
    print(f"speed-up with {args.shards} processes: wall {ratio_wall:.2f}x, collect loop {ratio_loop:.2f}x "
          f"(ideal {args.shards}x; {os.cpu_count()} cores here)")  # fmt: skip


def prompt_lengths() -> tuple[float, int]:
    """Mean Llama-2-chat prompt length in tokens (template included) on or-bench-hard-1k; post-instruction tokens."""
    import csv
    import shutil

    from transformers import AutoTokenizer

    from refusal_lab.config import ModelConfig
    from refusal_lab.models import chat_format, encode_prompts

    with tempfile.TemporaryDirectory() as tmp:
        # As benchmarks/bench_collect.py and tests/conftest.py build it: the real tokenizer and template.
        shutil.copy(SHARED / "tokenizers" / "llama2" / "tokenizer.model", Path(tmp) / "tokenizer.model")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.chat_template = json.loads((SHARED / "chat_templates" / "ollama_template_index.json").read_text())[28][
        "template"
    ]
    with (SHARED / "or_bench" / "or-bench-hard-1k.csv").open(newline="") as f:
        prompts = [row["prompt"] for row in csv.DictReader(f)]
    cfg = ModelConfig(name="llama2-tokenizer")
    ids = encode_prompts(cfg, tokenizer, prompts, 4096)
    fmt, _ = chat_format(cfg, tokenizer)
    return statistics.mean(map(len, ids)), fmt.n_post_instruction_tokens


def paper(shards: list[int]) -> None:
    mean_prompt, n_post = prompt_lengths()
    per_token = HOOKS * D_MODEL * BYTES_PER_VALUE + TOKEN_ROW
    gpu_s = N_PROMPTS_80K * mean_prompt / GPU_PREFILL_TOKENS_S
    gen_s = N_PROMPTS_80K / GPU_DECODE_SEQS_S
    policies = {
        "all": (mean_prompt + MAX_NEW_TOKENS, gpu_s + gen_s),
        "prompt": (mean_prompt, gpu_s),
        "last_prompt": (1, gpu_s),
        "post_instruction": (n_post, gpu_s),
        "generated": (MAX_NEW_TOKENS, gpu_s + gen_s),
    }
    print(
        "Assumptions: Llama-2-7B, d_model 4096, 32 residual hook points, float16 store; OR-Bench-80k = 80,359 prompts"
    )
    print(f"  mean prompt {mean_prompt:.1f} tokens with the Llama-2 chat template (measured on or-bench-hard-1k), "
          f"{n_post} post-instruction tokens, {MAX_NEW_TOKENS} generated (upper bound: no early EOS)")  # fmt: skip
    print(f"  on-disk = raw / {COMPRESSION} (lz4 bitshuffle); disk {DISK_BPS / 1e9} GB/s per node; "
          f"GPU {GPU_PREFILL_TOKENS_S:.0f} prompt tokens/s + {GPU_DECODE_SEQS_S:.0f} sequences/s generating "
          f"(assumed); shared file system {SHARED_FS_BPS / 1e9:.0f} GB/s aggregate (assumed)")  # fmt: skip
    head = f"{'positions':<17} {'tokens/prompt':>13} {'raw TB':>7} {'disk TB':>8} {'GPU min':>8} {'disk min':>9}"
    head += f" {'1 node min':>11}"
    head += "".join(f" {f'{n} nodes min':>13}" for n in shards) + "  binds"
    print(head)
    for name, (tokens, compute_s) in policies.items():
        raw = N_PROMPTS_80K * tokens * per_token
        on_disk = raw / COMPRESSION
        disk_s = on_disk / DISK_BPS
        one = max(compute_s, disk_s)
        line = f"{name:<17} {tokens:>13.1f} {raw / 1e12:>7.3f} {on_disk / 1e12:>8.3f} {compute_s / 60:>8.1f} "
        line += f"{disk_s / 60:>9.1f} {one / 60:>11.1f}"
        for n in shards:
            local = max(compute_s / n, disk_s / n)  # each node its own GPU and local disk
            line += f" {local / 60:>13.1f}"
        fs_floor = on_disk / SHARED_FS_BPS
        binds = "disk" if disk_s > compute_s else "GPU"
        print(line + f"  {binds} (N nodes on a shared FS: at least {fs_floor / 60:.1f} min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--paper", action="store_true", help="print the Llama-2-7B x OR-Bench-80k estimate instead")
    args = parser.parse_args()
    if args.paper:
        paper([8, 32])
    else:
        measure(args)


if __name__ == "__main__":
    main()
