"""Checkpointing: exact resume (multiset), deterministic bitwise replay, SIGKILL between save and restore."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import assert_exact_batches, assert_exact_rows, reference_pass, resumed_run
from test_lifecycle import shm_entries, wait_gone

import actvpipe
from actvpipe.generator import PAUSE_VARIABLE
from actvpipe.loader_state import LoaderState

CTX, GEN_BATCH, BUFFER, BATCH = 32, 4, 600, 100


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:10]


@pytest.fixture(scope="module")
def reference(model_dir, docs):
    return reference_pass(model_dir, docs, CTX)


def make_loader(model_dir, docs, deterministic=False, **overrides):
    args = {
        "context_length": CTX,
        "generation_batch_size": GEN_BATCH,
        "deterministic": deterministic,
        **overrides,
    }
    return actvpipe.stream(model_dir, docs, **args).buffer(BUFFER).batch(BATCH, with_tokens=True)


def keys(batches) -> torch.Tensor:
    return torch.cat([b.seq * CTX + b.pos for b in batches]) if batches else torch.zeros(0, dtype=torch.long)


def assert_is_the_full_pass(batches, reference):
    assert_exact_batches(batches, reference, CTX)
    seq, pos = (torch.cat([getattr(b, f) for b in batches]) for f in ("seq", "pos"))
    assert torch.equal(torch.cat([b.token_ids for b in batches]), reference[0][seq, pos])


def save_mid_pass(loader, midpoint):
    it = iter(loader)
    served = [next(it) for _ in range(midpoint)]
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    return it, served, state


@pytest.mark.parametrize("midpoint", [0, 17, 33])
def test_resume_serves_exactly_the_rest_of_the_pass(model_dir, docs, reference, midpoint):
    loader = make_loader(model_dir, docs)
    with loader:
        _, served, state = save_mid_pass(loader, midpoint)
    saved = LoaderState.from_dict(state).buffer
    assert saved.buffered.dtype == torch.int32 and saved.buffered.numel() <= BUFFER
    assert len(saved.blocks) == 1 and saved.blocks[0].shape[1] == 3
    with make_loader(model_dir, docs) as fresh:
        fresh.load_state_dict(state)
        rest = list(fresh)
        computed = fresh.counters()["computed"]
    assert_is_the_full_pass(served + rest, reference)
    total = len(reference[0]) * (CTX - 1)
    per_block = GEN_BATCH * (CTX - 1)
    assert computed <= (total - saved.frontiers[0]) + len(saved.blocks[0]) * per_block, (
        "reran more than was lost"
    )
    if midpoint > 20:
        assert computed < total, "the resumed run must not recompute the whole pass"


def test_state_from_the_end_starts_the_next_pass(model_dir, docs, reference):
    with make_loader(model_dir, docs) as loader:
        first = list(loader)
        state = loader.state_dict()
    assert_is_the_full_pass(first, reference)
    with make_loader(model_dir, docs) as fresh:
        fresh.load_state_dict(state)
        assert_is_the_full_pass(list(fresh), reference)


def run_test_save_load_state(model_dir, docs, midpoint):
    """torchdata's harness: a deterministic loader resumed at ``midpoint`` yields bitwise the rest."""
    with make_loader(model_dir, docs, deterministic=True) as loader:
        it, _, state = save_mid_pass(loader, midpoint)
        rest = list(it)
    with make_loader(model_dir, docs, deterministic=True) as fresh:
        fresh.load_state_dict(state)
        resumed = list(fresh)
    assert len(resumed) == len(rest)
    for a, b in zip(rest, resumed, strict=True):
        assert torch.equal(a.acts, b.acts) and torch.equal(a.seq, b.seq) and torch.equal(a.pos, b.pos)


@pytest.mark.parametrize("midpoint", [0, 12])
def test_deterministic_resume_is_bitwise(model_dir, docs, midpoint):
    run_test_save_load_state(model_dir, docs, midpoint)


def test_deterministic_runs_are_bitwise_equal(model_dir, docs, reference):
    runs = []
    for _ in range(2):
        with make_loader(model_dir, docs, deterministic=True) as loader:
            runs.append(list(loader))
    assert_is_the_full_pass(runs[0], reference)
    assert len(runs[0]) == len(runs[1])
    assert all(torch.equal(a.acts, b.acts) and torch.equal(a.seq, b.seq) for a, b in zip(*runs, strict=True))
    with make_loader(model_dir, docs, deterministic=True, seed=1) as other_seed:
        assert not torch.equal(next(iter(other_seed)).seq, runs[0][0].seq)


UNDER_LOAD = """
import pickle, sys, torch, actvpipe
docs = torch.load(sys.argv[1])

def loader():
    args = {"context_length": 32, "generation_batch_size": 4, "deterministic": True}
    stream = actvpipe.stream(sys.argv[2], docs, **args)
    return stream.buffer(600).batch(100, with_tokens=True)

with loader() as first:  # the first generator of this process is spawned, later ones forked
    it = iter(first)
    head = [next(it) for _ in range(12)]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    rest = list(it)
with loader() as again:
    whole = list(again)
resumed = loader()
resumed.load_state_dict(state)
with resumed:
    tail = list(resumed)
same = lambda a, b: len(a) == len(b) and all(
    torch.equal(x.acts, y.acts) and torch.equal(x.seq, y.seq) for x, y in zip(a, b)
)
print("RESULT", same(head + rest, whole), same(rest, tail), flush=True)
"""


def test_deterministic_replay_and_resume_are_bitwise_under_load(model_dir, docs, tmp_path):
    """With a CPU hog beside it, in a fresh process (a spawned generator first, then generators
    forked from the fork server): replay and resume are bitwise, and every GEMM of the forward runs
    in MKL's strict reproducible mode."""
    docs_file = tmp_path / "docs.pt"
    torch.save(docs, docs_file)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run(
            [sys.executable, "-c", UNDER_LOAD, str(docs_file), str(model_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "MKL_VERBOSE": "1"},
        )
    finally:
        hog.kill()
    assert out.returncode == 0, out.stderr
    assert "RESULT True True" in out.stdout
    if torch.backends.mkl.is_available():
        gemms = [line for line in out.stdout.splitlines() if "GEMM" in line]
        assert gemms and all("CNR:AUTO,STRICT" in line for line in gemms), gemms[:3]


COMMON = """
import json, os, signal, sys, torch, actvpipe
docs, cfg = torch.load(sys.argv[1]), json.loads(sys.argv[3])
stream = actvpipe.stream(sys.argv[2], docs, context_length=cfg["ctx"], generation_batch_size=cfg["gb"])
loader = stream.buffer(cfg["buf"]).batch(cfg["b"], with_tokens=True)
"""
SAVE_THEN_DIE = """
it = iter(loader)
served = [next(it) for _ in range(cfg["midpoint"])]
rows = [(b.seq, b.pos, b.acts) for b in served]
torch.save({"state": loader.state_dict(), "rows": rows, "pid": os.getpid()}, sys.argv[4])
os.kill(os.getpid(), signal.SIGKILL)
"""
RESUME = """
loader.load_state_dict(torch.load(sys.argv[4])["state"])
with loader:
    torch.save([(b.seq, b.pos, b.acts) for b in loader], sys.argv[5])
"""


def test_sigkill_right_after_saving_then_resume_in_a_new_process(model_dir, docs, reference, tmp_path):
    cfg = json.dumps({"ctx": CTX, "gb": GEN_BATCH, "buf": BUFFER, "b": BATCH, "midpoint": 11})
    docs_file, state_file, rest_file = tmp_path / "docs.pt", tmp_path / "state.pt", tmp_path / "rest.pt"
    torch.save(docs, docs_file)
    args = [docs_file, model_dir, cfg, state_file, rest_file]
    died = subprocess.run(
        [sys.executable, "-c", COMMON + SAVE_THEN_DIE, *args], capture_output=True, text=True, timeout=300
    )
    assert died.returncode == -9, died.stderr
    saved = torch.load(state_file)
    resumed = subprocess.run(
        [sys.executable, "-c", COMMON + RESUME, *args], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    rows = saved["rows"] + torch.load(rest_file)
    seq, pos, acts = (torch.cat([r[i] for r in rows]) for i in range(3))
    assert_exact_rows(seq, pos, acts, reference, CTX)
    assert wait_gone(saved["pid"]) and wait_for(lambda: not shm_entries(saved["pid"]))


def wait_for(condition, timeout=15.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_restore_reads_the_dataset_once_however_many_blocks_it_repacks(
    model_dir, texts, tmp_path, monkeypatch
):
    """A state whose buffer holds rows of many blocks: the restore scans the file once (documents
    between planned blocks are read, not tokenized), and the resumed pass is exact."""
    from torchdata.nodes import Loader

    import actvpipe.text
    from actvpipe.spec import GeneratorOptions

    docs = [f"{texts[i % len(texts)]} {i}" for i in range(60)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def loader():
        stream = actvpipe.stream(model_dir, str(data), context_length=CTX, generation_batch_size=2)
        return stream.buffer(3000).batch(BATCH, with_tokens=True)

    batches, state = resumed_run(loader, 12)
    assert_exact_batches(batches, reference_pass(model_dir, docs, CTX), CTX)
    (plan,), _ = LoaderState.from_dict(state).buffer.plans()
    assert len(plan.blocks) >= 20, "the saved buffer spans many blocks"

    opened = []
    real = actvpipe.text.document_blocks
    monkeypatch.setattr(
        actvpipe.text, "document_blocks", lambda *a, **k: (opened.append(k["start"]), real(*a, **k))[1]
    )
    regenerated = []
    for block in Loader(loader().spec.rows_graph(plan, GeneratorOptions())):
        regenerated.append(block.meta["row_id"])
        if sum(map(len, regenerated)) >= len(plan.buffered):
            break
    assert opened == [int(plan.blocks[0, 1])], "opened once, at the first planned block"
    ids = np.concatenate(regenerated)
    assert np.array_equal(ids[: len(plan.buffered)], plan.buffered), "the saved rows come first"


PUSH_PAUSE = 0.04  # seconds the test hook stops the generator after each store of a push


def test_a_state_saved_between_any_two_stores_of_a_push_resumes_exactly(
    model_dir, docs, reference, monkeypatch
):
    """The generator publishes where its next block starts (three words) after the count of rows it
    wrote. The test hook pauses it after each store of a push; the generator is stopped (SIGSTOP)
    in the j-th pause, the trainer serves a batch (so it publishes every row written) and saves;
    every such state resumes to exactly the pass. Before, the three words were stored one by one
    after ``written`` and read without a check of their own: stopped between two of them (a pause
    added there), the state paired the new block number with the old record and offset."""
    monkeypatch.setenv(PAUSE_VARIABLE, str(PUSH_PAUSE))
    states = []

    def make():
        stream = actvpipe.stream(model_dir, docs, context_length=CTX, generation_batch_size=2)
        return stream.buffer(3000, warmup=0.0).batch(50, with_tokens=True)

    loader = make()
    with loader:
        it = iter(loader)
        served = [next(it)]
        run, pid = loader._passes.run, loader.generator_pid
        deadline = time.monotonic() + 60
        while loader.counters()["written"] < 400:  # enough rows to serve while the generator is stopped
            assert time.monotonic() < deadline, "the generator stalled"
            time.sleep(0.01)
        for j in range(5):  # after the FIFO entries, after the count, after each word of the start
            deadline = time.monotonic() + 30
            while run.buffer.operation(0) != "pushing rows":
                assert time.monotonic() < deadline, "the generator never pushed"
                time.sleep(0.001)
            time.sleep(PUSH_PAUSE * (j + 0.5))
            os.kill(pid, signal.SIGSTOP)
            try:
                served.append(next(it))
                states.append((list(served), pickle.loads(pickle.dumps(loader.state_dict()))))
            finally:
                os.kill(pid, signal.SIGCONT)
    monkeypatch.setenv(PAUSE_VARIABLE, "0")
    for before, state in states:
        with make() as resumed:
            resumed.load_state_dict(state)
            assert_is_the_full_pass(before + list(resumed), reference)


def test_state_dict_works_at_any_moment_of_a_loaders_life_and_starts_nothing(model_dir, docs, reference):
    """Before the first batch, after ``close()`` and after the pass ended. Before, ``state_dict()``
    after ``close()`` raised AttributeError, and before the first batch it spawned the generators
    and, with ``normalize=``, ran the statistics pass."""

    def normalized():
        stream = actvpipe.stream(model_dir, docs, context_length=CTX, generation_batch_size=GEN_BATCH)
        return stream.buffer(BUFFER, normalize="sqrt_d", stats_rows=500).batch(BATCH, with_tokens=True)

    untouched = normalized()
    fresh = pickle.loads(pickle.dumps(untouched.state_dict()))
    assert untouched.generator_pid is None and untouched.normalization is None
    assert not shm_entries(os.getpid()), "nothing started"
    loader = make_loader(model_dir, docs)
    with loader:
        it = iter(loader)
        served = [next(it) for _ in range(7)]
    closed = pickle.loads(pickle.dumps(loader.state_dict()))
    with make_loader(model_dir, docs) as resumed:
        resumed.load_state_dict(closed)
        assert_is_the_full_pass(served + list(resumed), reference)
    with normalized() as whole:
        whole.load_state_dict(fresh)
        batches = list(whole)
        ended = pickle.loads(pickle.dumps(whole.state_dict()))
        scale = whole.normalization.scale
    for batch in batches:
        batch.acts.div_(scale)
    assert_exact_batches(batches, reference, CTX, rtol=1e-4, atol=1e-4)
    assert LoaderState.from_dict(ended).buffer.batches == len(batches)


def test_a_state_saved_with_a_device_hand_over_restores_without_one_and_back(model_dir, docs, reference):
    """The chain has the same nodes whatever ``device=`` is (the hand-over maps to itself without
    one), so a state saved on a GPU machine resumes on the CPU. Found by review: the hand-over node
    was in the chain only with a device, and each state failed in the other chain (KeyError)."""
    stream = actvpipe.stream(model_dir, docs, context_length=CTX, generation_batch_size=GEN_BATCH)
    for saving, resuming in (("cpu", None), (None, "cpu")):
        with stream.buffer(BUFFER).batch(BATCH, with_tokens=True, device=saving) as loader:
            it = iter(loader)
            served = [next(it) for _ in range(5)]
            state = pickle.loads(pickle.dumps(loader.state_dict()))
        with stream.buffer(BUFFER).batch(BATCH, with_tokens=True, device=resuming) as resumed:
            resumed.load_state_dict(state)
            assert_is_the_full_pass(served + list(resumed), reference)


def test_an_iterator_made_and_dropped_before_any_batch_does_not_start_another_pass(model_dir, docs):
    """Passes are counted where they start: an ``iter()`` that drew nothing reuses its run and its
    pass number. Found by review: the sampler counted every reset while the run was reused, so a
    deterministic loader iterated once for nothing served other batches, saved as pass 2."""

    def seqs(loader, warm_up: bool):
        with loader:
            if warm_up:
                iter(loader)
            batches = list(loader)
            number = LoaderState.from_dict(loader.state_dict()).buffer.pass_number
        return [b.seq.tolist() for b in batches], number

    plain = seqs(make_loader(model_dir, docs, deterministic=True), warm_up=False)
    assert seqs(make_loader(model_dir, docs, deterministic=True), warm_up=True) == plain
    assert plain[1] == 1


def test_start_while_iterating_keeps_the_pass_going(model_dir, docs, reference):
    """``start()`` while an iteration is under way has nothing to launch. Found by review: it
    closed the running pass under the iterator, whose next batch raised a GeneratorError."""
    with make_loader(model_dir, docs) as loader:
        it = iter(loader)
        served = [next(it), next(it)]
        loader.start()
        assert_is_the_full_pass(served + list(it), reference)
