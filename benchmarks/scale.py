"""Scale: what stays cheap on a corpus of realistic shape (issue 13), measured on a corpus this module
generates (1M documents of 40 words as one jsonl file and as 8 parquet shards; 200k with --quick).

- start() and close() latency for every local dataset form (target: under 50 and 100 ms);
- restore -> first batch ÷ fresh loader -> first batch, for states saved at 5%, 50% and 95% of a
  pass (target: within 2x). A state at 95% of a million documents is built by running only the
  packer up to there (no model): the buffered rows are those of the last 8 blocks, as a real
  buffer of that size holds;
- the text stage of rank 0 of W (read its share, tokenize, pack) ÷ the tokenizer backend's own
  batch call over that share, the call the packer makes (and, in the note, ÷ the batched
  ``tokenizer(texts)``, which also builds offsets and masks), for W = 1, 2, 4 ranks (target: 0.9),
  with the documents each rank reads and tokenizes; on the first 100,000 documents (30,000 with
  --quick) as one jsonl file and as 4 parquet files (20 row groups), every side warmed up (the
  tokenizer caches words), then timed bare, backend, ours, ours, backend, bare.

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
from actvpipe.loader_state import BufferState, LoaderState
from actvpipe.models import load_tokenizer
from actvpipe.text import DocumentBlocks, PackedContexts, batch_encoder
from benchmarks.common import Result, cli

CONTEXT, GEN_BATCH, BUFFER, BATCH = 128, 64, 100_000, 4096


# The text stage is timed on the first documents (a pass of 1M takes minutes): 100k, 30k with --quick.
TEXT_STAGE_DOCS = {False: 100_000, True: 30_000}


def corpus(directory: Path, n_docs: int, sample_docs: int) -> tuple[Path, Path]:
    """``n_docs`` documents of 40 words drawn from the bundled corpus: a jsonl file and 8 parquet
    shards; also the first ``sample_docs`` as ``sample.jsonl`` and as 4 parquet files (``sample/``,
    20 row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = " ".join(corpus_texts()).split()
    rng = random.Random(0)
    docs = [" ".join(rng.choices(words, k=40)) for _ in range(n_docs)]
    jsonl = directory / "corpus.jsonl"
    with open(jsonl, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    with open(directory / "sample.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:sample_docs])
    forms = (("parquet", n_docs, 8, 10_000), ("sample", sample_docs, 4, sample_docs // 20))
    for name, n, files, group in forms:
        (directory / name).mkdir()
        for k, part in enumerate(np.array_split(np.arange(n), files)):
            table = pa.table({"text": [docs[i] for i in part]})
            pq.write_table(table, directory / name / f"part-{k}.parquet", row_group_size=group)
    return jsonl, directory / "parquet"


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
        template = LoaderState.from_dict(pickle.loads(pickle.dumps(loader.state_dict())))
    spec = stream.spec
    documents = DocumentBlocks(spec.dataset)
    packer = PackedContexts(documents, load_tokenizer(spec.model.tokenizer), CONTEXT, GEN_BATCH)
    packer.reset(None)
    blocks, tokens = [], []
    for block in packer:
        blocks.append((block.first_seq, *block.start))
        tokens.append(block.tokens[:, 1:].reshape(-1))  # the rows' tokens: positions 1.. of each context
        if documents.documents_read >= fraction * n_docs:
            break
    per_context = CONTEXT - 1
    held = blocks[-9:-1]  # the buffer holds the last 8 blocks' rows
    ids = np.concatenate([np.arange(s * per_context, (s + GEN_BATCH) * per_context) for s, _, _ in held])
    meta = {
        "row_id": ids,
        "source": np.zeros(len(ids), dtype=np.int64),
        "token_ids": np.concatenate(tokens[-9:-1]),
        **{
            key: np.repeat([b[i] for b in held], GEN_BATCH * per_context)
            for i, key in enumerate(("block_seq", "block_record", "block_offset"))
        },
    }
    saved = template.buffer
    frontier = blocks[-1][0] * per_context
    made = BufferState.capture(
        saved.rng, saved.pass_number, saved.batches, saved.published, [frontier], meta, [blocks[-1]]
    )
    sampler = template.sampler_state()
    sampler.update(made.to_dict())
    return template.to_dict()


def first_batch_seconds(data, state: dict | None) -> float:
    loader = loader_for(data).buffer(BUFFER).batch(BATCH)
    began = time.perf_counter()
    if state is not None:
        loader.load_state_dict(state)
    with loader:
        next(iter(loader))
        return time.perf_counter() - began


def share_of(data: str, rank: int, world_size: int) -> tuple[list[str], int, int]:
    """(rank ``rank``'s documents, how many it read, how many it tokenized) in a full pass of the
    text stage over ``data`` (untimed)."""
    spec = loader_for(data).spec
    documents = DocumentBlocks(spec.dataset, rank=rank, world_size=world_size)
    documents.reset(None)
    texts = [text for block in documents for _, text in block]
    packer = PackedContexts(
        DocumentBlocks(spec.dataset, rank=rank, world_size=world_size),
        load_tokenizer(spec.model.tokenizer),
        CONTEXT,
        GEN_BATCH,
        rank=rank,
        world_size=world_size,
    )
    packer.reset(None)
    for _ in packer:
        pass
    return texts, documents.documents_read, packer.documents_tokenized


def text_stage(data: str, world_size: int) -> tuple[float, float, float]:
    """Tokens of rank 0's share per second: (rank 0's text stage, the bare batched tokenizer call,
    the tokenizer backend's own batch call) over that share. The tokenizer caches words, so every
    side runs once before timing, then in the order bare, backend, ours, ours, backend, bare."""
    spec = loader_for(data).spec
    tokenizer = load_tokenizer(spec.model.tokenizer)
    share, _, _ = share_of(data, 0, world_size)

    def ours() -> float:
        documents = DocumentBlocks(spec.dataset, rank=0, world_size=world_size)
        packer = PackedContexts(documents, tokenizer, CONTEXT, GEN_BATCH, rank=0, world_size=world_size)
        packer.reset(None)
        began = time.perf_counter()
        for _ in packer:
            pass
        return time.perf_counter() - began

    def batched(encode) -> float:
        began = time.perf_counter()
        for i in range(0, len(share), 256):
            encode(share[i : i + 256])
        return time.perf_counter() - began

    sides = {
        "ours": ours,
        "bare": lambda: batched(lambda texts: tokenizer(texts, add_special_tokens=False)),
        "backend": lambda: batched(batch_encoder(tokenizer)),
    }
    tokens = sum(len(ids) for ids in tokenizer(share, add_special_tokens=False)["input_ids"])
    for run in sides.values():  # warm the tokenizer's word cache for each
        run()
    seconds = dict.fromkeys(sides, 0.0)
    for side in ("bare", "backend", "ours", "ours", "backend", "bare"):
        seconds[side] += sides[side]()
    ours_rate, bare_rate, backend_rate = (2 * tokens / seconds[k] for k in ("ours", "bare", "backend"))
    return ours_rate, bare_rate, backend_rate


def results(quick: bool) -> list[Result]:
    n_docs = 200_000 if quick else 1_000_000
    out = []
    with tempfile.TemporaryDirectory(prefix="actvpipe-scale-") as tmp:
        sample_docs = TEXT_STAGE_DOCS[quick]
        jsonl, shards = corpus(Path(tmp), n_docs, sample_docs)
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
        for name, sample in (("jsonl", Path(tmp) / "sample.jsonl"), ("parquet", Path(tmp) / "sample")):
            for world_size in (1, 2, 4):
                counts = [share_of(str(sample), r, world_size)[1:] for r in range(world_size)]
                ours, bare, backend = text_stage(str(sample), world_size)
                label = f"text stage, {name}, rank 0 of {world_size}, own share / tokenizer backend"
                rates = f"{ours / 1e6:.2f} M tok/s", f"{backend / 1e6:.2f} M tok/s"
                per_rank = ", ".join(f"{r:,}/{t:,}" for r, t in counts)
                note = (
                    f"÷ tokenizer(texts) {ours / bare:.3f}; documents read/tokenized per rank: "
                    f"{per_rank} of {sample_docs:,}"
                )
                out.append(Result(label, *rates, ours / backend, ">= 0.9", note))
    return out


if __name__ == "__main__":
    cli(__doc__, results, "benchmarks.scale")
