"""Reading at scale: each rank of W reads only its share of many local files (byte ranges of jsonl
and txt, parquet row groups), the shares hold every document exactly once, and reading resumes
from any saved record by a seek, per rank."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_exact_batches, reference_contexts, reference_pass, resumed_run

import actvpipe
from actvpipe.documents import resolve_dataset
from actvpipe.models import load_tokenizer
from actvpipe.resume import PlannedContexts, ResumePlan
from actvpipe.text import DocumentBlocks, PackedContexts

N_DOCS = 30_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    """30k unique documents of 1-120 words (some blank, some non-ASCII) in 5 jsonl files of uneven
    size, 3 txt files, 7 parquet files of 1000-row groups, and one parquet file of a single group."""
    root = tmp_path_factory.mktemp("corpus")
    words = [*" ".join(texts).split(), "naïve", "東京", "emoji🙂"]
    rng = random.Random(0)
    docs = [f"d{i} " + " ".join(rng.choices(words, k=rng.randint(0, 120))) for i in range(N_DOCS)]
    blank = set(rng.sample(range(N_DOCS), 300))
    docs = ["" if i in blank else d for i, d in enumerate(docs)]
    for name, cuts in (("jsonl", [0, 1000, 9000, 9001, 20000, N_DOCS]), ("txt", [0, 12000, 25000, N_DOCS])):
        (root / name).mkdir()
        for k, (a, b) in enumerate(itertools.pairwise(cuts)):
            part = enumerate(docs[a:b], a)
            lines = [json.dumps({"text": d, "n": i}) if name == "jsonl" else d for i, d in part]
            (root / name / f"part{k}.{name}").write_text("".join(line + "\n" for line in lines))
    (root / "parquet").mkdir()
    for k, part in enumerate(np.array_split(np.arange(N_DOCS), 7)):
        table = pa.table({"text": [docs[i] for i in part]})
        pq.write_table(table, root / "parquet" / f"part{k}.parquet", row_group_size=1000)
    pq.write_table(pa.table({"text": docs}), root / "one_group.parquet", row_group_size=N_DOCS)
    return root, docs


def rank_documents(dataset, rank: int, world_size: int, state: dict | None = None) -> tuple[list, int]:
    node = DocumentBlocks(resolve_dataset(dataset), block_docs=256, rank=rank, world_size=world_size)
    node.reset(state)
    docs = [doc for block in node for doc in block]
    return docs, node.documents_read


def all_documents(dataset) -> list:
    return rank_documents(dataset, 0, 1)[0]


def byte_range_share(directory, rank: int, world_size: int) -> list[str]:
    """Rank ``rank``'s documents, computed from the files: the lines whose first byte lies in the
    rank's ``1/world_size`` byte range of each file."""
    out = []
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        low, high = len(data) * rank // world_size, len(data) * (rank + 1) // world_size
        start = 0
        for line in data.splitlines(keepends=True):
            if low <= start < high:
                text = json.loads(line)["text"] if path.suffix == ".jsonl" else line.decode().rstrip("\n")
                if text:
                    out.append(text)
            start += len(line)
    return out


@pytest.mark.parametrize("form", ["jsonl", "txt", "parquet", "one_group.parquet", "list"])
def test_ranks_read_disjoint_shares_that_hold_every_document_once(corpus, form):
    root, docs = corpus
    dataset = docs if form == "list" else root / form
    everything = sorted(d for d in docs if d)
    for world_size in (1, 2, 3, 4):
        shares = [rank_documents(dataset, r, world_size) for r in range(world_size)]
        union = sorted(text for share, _ in shares for _, text in share)
        assert union == everything, f"W={world_size}: every document exactly once"
        for rank, (share, read) in enumerate(shares):
            assert read == len(share), "a rank reads only its own documents"
            assert abs(read - len(everything) / world_size) < 0.06 * len(everything) / world_size
            if form in ("jsonl", "txt"):
                assert [text for _, text in share] == byte_range_share(root / form, rank, world_size)


@pytest.mark.parametrize("form", ["jsonl", "parquet", "one_group.parquet", "list"])
def test_a_rank_resumes_from_any_saved_record(corpus, form):
    root, docs = corpus
    dataset = docs if form == "list" else root / form
    rng = random.Random(1)
    for rank, world_size in ((0, 1), (2, 3)):
        full, _ = rank_documents(dataset, rank, world_size)
        for cut in [0, len(full) - 1, *rng.sample(range(len(full)), 5)]:
            rest, read = rank_documents(dataset, rank, world_size, {"record": full[cut][0]})
            assert rest == full[cut:], f"rank {rank}/{world_size} resumed at document {cut}"
            assert read == len(rest), "a seek: nothing before the saved record is read again"


def test_a_rank_serves_exactly_the_pass_over_its_share_across_a_resume(tmp_path, model_dir, texts):
    """Rank 1 of 2 over three jsonl files: its rows, across a checkpoint and restore, are exactly the
    single-process pass over its byte-range share (packed on its own), numbered as its blocks."""
    docs = [f"{texts[i % len(texts)]} {i}" for i in range(90)]
    for k in range(3):
        lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[k * 30 : (k + 1) * 30])
        (tmp_path / f"part{k}.jsonl").write_text(lines)
    ctx, block = 32, 2

    def loader():
        stream = actvpipe.stream(
            model_dir, tmp_path, context_length=ctx, generation_batch_size=block, rank=1, world_size=2
        )
        return stream.buffer(3000).batch(100, with_tokens=True)

    batches, _ = resumed_run(loader, 6)
    assert all(((b.seq // block) % 2 == 1).all() for b in batches), "global block 2b + 1 is its block b"
    local = [dataclasses.replace(b, seq=b.seq // block // 2 * block + b.seq % block) for b in batches]
    assert_exact_batches(local, reference_pass(model_dir, byte_range_share(tmp_path, 1, 2), ctx), ctx)


def test_packing_many_documents_matches_the_reference_and_repacks_any_planned_blocks(corpus, model_dir):
    """All 30k documents of the jsonl files packed equal the design notes' packing written out
    plainly; a restore plan of blocks in the last third re-packs each one exactly: a seek to the
    first, then one scan (torchdata asks for the state before the first block)."""
    root, docs = corpus
    tokenizer = load_tokenizer(str(model_dir))
    ctx, per_block = 64, 16

    def packer():
        documents = DocumentBlocks(resolve_dataset(root / "jsonl"), block_docs=256)
        return documents, PackedContexts(documents, tokenizer, ctx, per_block)

    documents, contexts = packer()
    contexts.reset(None)
    blocks = list(contexts)
    assert [b.first_seq for b in blocks] == list(range(0, per_block * len(blocks), per_block))
    expected = reference_contexts(model_dir, docs, ctx).numpy()
    assert np.array_equal(np.concatenate([b.tokens for b in blocks]), expected)

    picked = sorted(random.Random(2).sample(range(2 * len(blocks) // 3, len(blocks) - 1), 6))
    plan_blocks = np.array([(blocks[i].first_seq, *blocks[i].start) for i in picked], dtype=np.int64)
    plan = ResumePlan(0, np.zeros(0, dtype=np.int64), plan_blocks)
    documents, contexts = packer()
    planned = PlannedContexts(contexts, plan)
    planned.reset(None)
    planned.state_dict()  # as torchdata's prefetcher does before the first next()
    for i in picked:
        again = next(planned)
        assert again.first_seq == blocks[i].first_seq and np.array_equal(again.tokens, blocks[i].tokens)
    assert next(planned).first_seq == blocks[picked[-1] + 1].first_seq, "streams on after the last"
    after_first = sum(1 for record, _ in all_documents(root / "jsonl") if record >= plan_blocks[0, 1])
    assert documents.documents_read <= after_first, "a seek to the first planned block, then one scan"
