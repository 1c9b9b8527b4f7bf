"""Distributed: each rank reads, tokenizes and packs its own share of the documents, with its own
state; across a checkpoint and resume on every rank, each rank serves exactly the pass over its
share, and the shares hold every document once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_exact_rows, reference_pass

import actvpipe

CTX, BLOCK = 32, 4

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    import actvpipe

    model, docs_file, out = sys.argv[1:]
    dist.init_process_group("gloo")
    docs = json.load(open(docs_file))
    stream = actvpipe.stream(model, docs, context_length=32, generation_batch_size=4)
    served = []

    def take(batches):
        served.extend(batches)

    # Each rank checkpoints after 3 batches and finishes the pass from its own state.
    with stream.buffer(1000).batch(100, with_tokens=True) as loader:
        it = iter(loader)
        take(next(it) for _ in range(3))
        state = loader.state_dict()
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    other = stream.buffer(1000).batch(100, with_tokens=True)
    try:
        other.load_state_dict(states[1 - dist.get_rank()])
        crossed = "loaded"
    except ValueError as exc:
        crossed = str(exc)
    with stream.buffer(1000).batch(100, with_tokens=True) as loader:
        loader.load_state_dict(state)
        take(loader)
    rows = {f: torch.cat([getattr(b, f) for b in served]) for f in ("seq", "pos", "acts")}
    spec = [stream.spec.rank, stream.spec.world_size]
    torch.save({**rows, "spec": spec, "crossed": crossed}, f"{out}.{dist.get_rank()}")
    dist.destroy_process_group()
    """
)


def test_torchrun_ranks_cover_the_pass_once_across_a_resume(tmp_path, model_dir, texts):
    docs = texts[:8]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    (tmp_path / "train.py").write_text(SCRIPT)
    out = tmp_path / "out.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(tmp_path / "train.py"),
            str(model_dir),
            str(tmp_path / "docs.json"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert [r["spec"] for r in ranks] == [[0, 2], [1, 2]], "rank and world size come from torch.distributed"
    for rank, served in enumerate(ranks):
        assert "rank: saved" in served["crossed"] and "build the loader" in served["crossed"]
        # Rank r packs documents r, r + 2, ...; its b-th block of BLOCK contexts is global block 2b + r.
        block, within = served["seq"] // BLOCK, served["seq"] % BLOCK
        assert (block % 2 == rank).all(), "row ids of the two ranks never collide"
        local = block // 2 * BLOCK + within
        reference = reference_pass(model_dir, docs[rank::2], CTX)
        assert_exact_rows(local, served["pos"], served["acts"], reference, CTX)


def test_explicit_rank_and_its_checks(model_dir, texts):
    stream = actvpipe.stream(model_dir, texts[:2], context_length=CTX, rank=1, world_size=3)
    assert (stream.spec.rank, stream.spec.world_size) == (1, 3)
    assert actvpipe.stream(model_dir, texts[:2], context_length=CTX).spec.world_size == 1
    for bad in ({"rank": 3, "world_size": 3}, {"rank": 0}, {"rank": -1, "world_size": 2}):
        with pytest.raises(ValueError, match="rank"):
            actvpipe.stream(model_dir, texts[:2], context_length=CTX, **bad)
    assert torch.distributed.is_available()
