"""Scale: what stays cheap on a corpus of realistic shape (issue 13), measured on a corpus this module
generates (1M documents of 40 words as one jsonl file and as 8 parquet shards; 200k with --quick).

- start() and close() latency for every local dataset form (target: under 50 and 100 ms);
- restore -> first batch ÷ fresh loader -> first batch, for states saved at 5%, 50% and 95% of a
  pass (target: within 2x). A state at 95% of a million documents is built by running only the
  packer up to there (no model): the buffered rows are those of the last 8 blocks, as a real
  buffer of that size holds;
- the text stage per rank (read, tokenize, pack, shard) ÷ the bare batched tokenizer over the
  rank's own share of the documents, for W = 1, 2, 4 ranks (target: 0.9), with the documents each
  rank reads and tokenizes; on the first 100,000 documents, both sides warmed up (the tokenizer
  caches words), then timed in the order bare, ours, ours, bare.

Run: python -m benchmarks.scale [--quick]
"""

from __future__ import annotations

import json
import pickle
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import actvpipe
from actvpipe.demo import corpus_texts, demo_model_dir
from actvpipe.models import load_tokenizer
from actvpipe.resume import make_state
from actvpipe.text import DocumentBlocks, PackedContexts, ShardedContexts
from benchmarks.common import Result, cli

CONTEXT, GEN_BATCH, BUFFER, BATCH = 128, 64, 100_000, 4096


TEXT_STAGE_DOCS = 100_000  # the text stage is timed on the first documents (a pass of 1M takes minutes)


def corpus(directory: Path, n_docs: int) -> tuple[Path, Path]:
    """``n_docs`` documents of 40 words drawn from the bundled corpus: a jsonl file and 8 parquet
    shards; also ``sample.jsonl``, the first ``TEXT_STAGE_DOCS``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = " ".join(corpus_texts()).split()
    rng = random.Random(0)
    docs = [" ".join(rng.choices(words, k=40)) for _ in range(n_docs)]
    jsonl = directory / "corpus.jsonl"
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    with open(directory / "sample.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:TEXT_STAGE_DOCS])
    shards = directory / "parquet"
    shards.mkdir()
    for k, part in enumerate(np.array_split(np.arange(n_docs), 8)):
        table = pa.table({"text": [docs[i] for i in part]})
        pq.write_table(table, shards / f"part-{k}.parquet", row_group_size=10_000)
    return jsonl, shards


def read_texts(path: Path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def loader_for(data):
    return actvpipe.stream(demo_model_dir(), data, context_length=CONTEXT, generation_batch_size=GEN_BATCH)


def start_close(data) -> tuple[float, float]:
    """Median start() and close() seconds over 5 loaders after a first one (which starts the fork server)."""
    stream = loader_for(data)
    starts, closes = [], []
    for i in range(6):
        loader = stream.buffer(10_000).batch(1000)
        began = time.perf_counter()
        loader.start()
        started = time.perf_counter() - began
        next(iter(loader))
        began = time.perf_counter()
        loader.close()
        if i:
            starts.append(started)
            closes.append(time.perf_counter() - began)
    return statistics.median(starts), statistics.median(closes)


def state_at(data, fraction: float, n_docs: int) -> dict:
    """A loader state as if saved at ``fraction`` of the pass, built by packing alone (no model)."""
    stream = loader_for(data)
    loader = stream.buffer(BUFFER).batch(BATCH)
    with loader:  # a real state, for everything but the position
        next(iter(loader))
        template = pickle.loads(pickle.dumps(loader.state_dict()))
    spec = stream.spec
    packer = PackedContexts(
        DocumentBlocks(spec.dataset), load_tokenizer(spec.model.tokenizer), CONTEXT, GEN_BATCH
    )
    packer.reset(None)
    blocks = []
    for block in packer:
        blocks.append((block.first_seq, *block.start))
        if block.start[0] >= fraction * n_docs:
            break
    per_context = CONTEXT - 1
    held = blocks[-9:-1]  # the buffer holds the last 8 blocks' rows
    ids = np.concatenate([np.arange(s * per_context, (s + GEN_BATCH) * per_context) for s, _, _ in held])
    meta = {
        "row_id": ids,
        "source": np.zeros(len(ids), dtype=np.int64),
        **{
            key: np.repeat([b[i] for b in held], GEN_BATCH * per_context)
            for i, key in enumerate(("block_seq", "block_record", "block_offset"))
        },
    }
    root = template["root"]
    sampler = {k: root[k] for k in ("rng", "pass", "batches", "published", "normalization")}
    frontier = blocks[-1][0] * per_context
    state = make_state(loader._node.fingerprint(), [frontier], meta, [blocks[-1]], sampler)
    return {**template, "root": state}


def first_batch_seconds(data, state: dict | None) -> float:
    loader = loader_for(data).buffer(BUFFER).batch(BATCH)
    began = time.perf_counter()
    if state is not None:
        loader.load_state_dict(state)
    with loader:
        next(iter(loader))
        return time.perf_counter() - began


def text_stage(path: Path, world_size: int) -> tuple[float, float, int]:
    """(rank 0's tokens/s over its own share, the bare batched tokenizer's tokens/s over that share,
    the documents rank 0 read and tokenized), on the jsonl file ``path``. The tokenizer caches words,
    so both sides run once before timing, then in the order bare, ours, ours, bare (ABBA)."""
    spec = loader_for(str(path)).spec
    tokenizer = load_tokenizer(spec.model.tokenizer)
    share = read_texts(path)
    share = share[: len(share) // world_size]

    def ours() -> tuple[int, float, int]:
        documents = DocumentBlocks(spec.dataset)
        packer = PackedContexts(documents, tokenizer, CONTEXT, GEN_BATCH)
        contexts = ShardedContexts(packer, 0, world_size, GEN_BATCH) if world_size > 1 else packer
        contexts.reset(None)
        began = time.perf_counter()
        tokens = sum(block.tokens.size for block in contexts)
        return tokens, time.perf_counter() - began, documents.state_dict()["record"]

    def bare() -> tuple[int, float, int]:
        began = time.perf_counter()
        encoded = (
            tokenizer(share[i : i + 256], add_special_tokens=False)["input_ids"]
            for i in range(0, len(share), 256)
        )
        tokens = sum(len(ids) for batch in encoded for ids in batch)
        return tokens, time.perf_counter() - began, len(share)

    ours(), bare()  # warm the tokenizer's word cache for both
    runs = {"bare": [], "ours": []}
    for side in ("bare", "ours", "ours", "bare"):
        runs[side].append((ours if side == "ours" else bare)())
    rate = {side: sum(r[0] for r in rs) / sum(r[1] for r in rs) for side, rs in runs.items()}
    return rate["ours"], rate["bare"], runs["ours"][0][2]


def results(quick: bool) -> list[Result]:
    n_docs = 200_000 if quick else 1_000_000
    out = []
    with tempfile.TemporaryDirectory(prefix="actvpipe-scale-") as tmp:
        jsonl, shards = corpus(Path(tmp), n_docs)
        texts = read_texts(jsonl)
        import datasets

        forms = {
            "jsonl file": str(jsonl),
            "parquet directory": str(shards),
            "list of strings": texts,
            "in-memory datasets.Dataset": datasets.Dataset.from_dict({"text": texts}),
            "IterableDataset": datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(),
        }
        for name, data in forms.items():
            start, close = start_close(data)
            times = f"{start * 1e3:.1f} ms", f"{close * 1e3:.1f} ms"
            out.append(
                Result(f"start() / close(), {name}", *times, None, "< 50 / < 100 ms", f"{n_docs:,} docs")
            )
        for name, data in (("jsonl", str(jsonl)), ("parquet", str(shards))):
            fresh = first_batch_seconds(data, None)
            for fraction in (0.05, 0.5, 0.95):
                restored = first_batch_seconds(data, state_at(data, fraction, n_docs))
                label = f"restore -> first batch / fresh, {name}, saved at {fraction:.0%}"
                out.append(Result(label, f"{restored:.2f} s", f"{fresh:.2f} s", restored / fresh, "<= 2"))
        sample = Path(tmp) / "sample.jsonl"
        for world_size in (1, 2, 4):
            ours, bare, tokenized = text_stage(sample, world_size)
            label = f"text stage, rank 0 of {world_size}, own share / bare tokenizer"
            rates = f"{ours / 1e6:.2f} M tok/s", f"{bare / 1e6:.2f} M tok/s"
            note = f"rank 0 read and tokenized {tokenized:,} of {TEXT_STAGE_DOCS:,} documents"
            out.append(Result(label, *rates, ours / bare, ">= 0.9", note))
    return out


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.scale")
