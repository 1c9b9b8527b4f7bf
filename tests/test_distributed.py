"""Distributed: each rank streams a disjoint, balanced shard with its own state; the union (across a
checkpoint and resume on every rank) is the single-process pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import reference_pass

import actvpipe

CTX, BLOCK = 32, 4

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    import actvpipe

    model, docs_file, out = sys.argv[1:]
    dist.init_process_group("gloo")
    docs = json.load(open(docs_file))
    stream = actvpipe.stream(model, docs, context_length=32, generation_batch_size=4)
    keys, total = [], 0.0

    def take(batches):
        global total
        for batch in batches:
            keys.extend((batch.seq * 32 + batch.pos).tolist())
            total += float(batch.acts.double().sum())

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
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank(), "spec": [stream.spec.rank,
                           stream.spec.world_size], "keys": keys, "total": total, "crossed": crossed})
    if dist.get_rank() == 0:
        json.dump(gathered, open(out, "w"))
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
    ranks = json.loads(out.read_text())
    assert [r["spec"] for r in ranks] == [[0, 2], [1, 2]], "rank and world size come from torch.distributed"
    for r in ranks:  # a rank's state restores only on that rank
        assert "rank: saved" in r["crossed"] and "build the loader with the saved values" in r["crossed"]
    contexts, rows = reference_pass(model_dir, docs, CTX)
    expected = {seq * CTX + pos for seq in range(len(contexts)) for pos in range(1, CTX)}
    first, second = (set(r["keys"]) for r in ranks)
    assert len(first) == len(ranks[0]["keys"]) and len(second) == len(ranks[1]["keys"])
    assert not first & second, "disjoint shards"
    assert first | second == expected, "their union is the single-process pass"
    assert abs(len(first) - len(second)) <= BLOCK * (CTX - 1), "balanced to within one block"
    total = sum(r["total"] for r in ranks)
    assert total == pytest.approx(float(rows[:, 1:].double().sum()), rel=1e-4)


def test_explicit_rank_and_its_checks(model_dir, texts):
    stream = actvpipe.stream(model_dir, texts[:2], context_length=CTX, rank=1, world_size=3)
    assert (stream.spec.rank, stream.spec.world_size) == (1, 3)
    assert actvpipe.stream(model_dir, texts[:2], context_length=CTX).spec.world_size == 1
    for bad in ({"rank": 3, "world_size": 3}, {"rank": 0}, {"rank": -1, "world_size": 2}):
        with pytest.raises(ValueError, match="rank"):
            actvpipe.stream(model_dir, texts[:2], context_length=CTX, **bad)
    assert torch.distributed.is_available()
