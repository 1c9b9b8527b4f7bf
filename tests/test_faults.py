"""Faults at the worst instant, on real processes and real shared memory: generators and trainers
SIGKILLed at random moments (inside buffer operations too), exceptions inside ``next()``, close()
in the middle of a forward."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_exact_batches, reference_pass
from test_lifecycle import gone, shm_entries, wait_gone

import actvpipe
from actvpipe import ledger as ledger_module
from actvpipe.device_copy import DeviceCopy
from actvpipe.generator import PAUSE_VARIABLE
from actvpipe.ledger import Ledger
from actvpipe.monitor import Monitor
from actvpipe.pass_run import PassRun
from actvpipe.shm import TrainerView
from actvpipe.stats import Normalization

CTX, BATCH, BUFFER = 32, 100, 500
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:10]


@pytest.fixture(scope="module")
def reference(model_dir, docs):
    return reference_pass(model_dir, docs, CTX)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, model_dir, texts):
    path = tmp_path_factory.mktemp("faults") / "rows.h5"
    return actvpipe.stream(model_dir, texts[:12], context_length=CTX).to_hdf5(path, progress=False)


def sem_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sem.")}


def kill_generator_during_pass(loader, rng: np.random.Generator, rows: int) -> str | None:
    """Serve a random number of batches, SIGKILL the generator after a random pause, then drain:
    the ``GeneratorError`` text, or None if the generator had finished its pass first. Fails if the
    error took more than 5 seconds to surface."""
    before = int(rng.integers(0, (rows - BUFFER) // BATCH))  # the generator has rows left to write
    with loader:
        it = iter(loader)
        try:
            for _ in range(before):
                next(it)
            time.sleep(float(rng.uniform(0, 0.02)))
            try:
                os.kill(loader.generator_pid, 9)
            except ProcessLookupError:
                return None
            killed = time.monotonic()
            for _ in it:
                pass
        except actvpipe.GeneratorError as error:
            assert time.monotonic() - killed < 5, "the death surfaced late"
            return str(error)
    return None


def test_generator_killed_at_80_random_moments_always_surfaces(
    model_dir, docs, reference, cache_file, monkeypatch
):
    """60 kills of an HDF5 reader (it starts in milliseconds) and 20 of a live model, half of each
    with every buffer operation paused halfway so kills land inside them."""
    rng = np.random.default_rng(0)
    live_rows = len(reference[0]) * (CTX - 1)
    file_rows = actvpipe.from_hdf5(cache_file).spec.files[0].rows
    sems = sem_entries()
    seen: dict[str, int] = {}
    outcomes = []
    for trial in range(80):
        monkeypatch.setenv(PAUSE_VARIABLE, "0.002" if trial % 2 else "0")
        if trial % 4 == 0:
            loader = actvpipe.stream(model_dir, docs, context_length=CTX).buffer(BUFFER).batch(BATCH)
            rows = live_rows
        else:
            loader = actvpipe.from_hdf5(cache_file).buffer(BUFFER).batch(BATCH)
            rows = file_rows
        error = kill_generator_during_pass(loader, rng, rows)
        outcomes.append(error is not None)
        if error is not None:
            assert "SIGKILL" in error
            doing = error.split("while ")[1].split(")")[0]
            seen[doing] = seen.get(doing, 0) + 1
        assert not shm_entries(os.getpid()), "the block is removed"
    assert sum(outcomes) >= 72, "the kills landed before the passes finished"
    inside = {"computing or waiting", "claiming slots", "writing rows", "pushing rows"}
    assert inside <= set(seen) <= {*inside, "waiting for free slots"}, seen
    assert sem_entries() <= sems, "no named semaphore is created"


def test_trainer_killed_at_50_random_moments_leaves_nothing(model_dir, cache_file):
    script = HERE / "kill_trainers.py"
    out = subprocess.run(
        [sys.executable, str(script), "50", "1", str(model_dir), str(cache_file)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    trials, server = lines[:-1], lines[-1]["fork_server"]
    assert len(trials) == 50
    left = [t for t in trials if t["generators"] or t["blocks"]]
    assert not left, f"left behind after 10 s: {left}"
    assert wait_gone(server, timeout=10), "the fork server exits with the last trainer"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("sem.mp")], "no named semaphore"


# (owner, attribute, when): the fault is raised before or after the real call runs.
STEPS = [
    (PassRun, "check_alive", "before"),
    (Ledger, "mirror", "after"),
    (Ledger, "publish", "after"),
    (Ledger, "grant", "after"),
    (Ledger, "draw", "after"),
    (TrainerView, "gather", "after"),
    (TrainerView, "provenance", "after"),
    (Normalization, "apply_", "after"),
    (DeviceCopy, "to_device", "after"),
    (Monitor, "after_batch", "after"),
    (ledger_module, "remove_positions", "after"),
]


class Injected(KeyboardInterrupt):
    """What the tests raise inside next(): a KeyboardInterrupt, like a Ctrl-C at that instant."""


def arm(monkeypatch, owner, name: str, when: str) -> dict:
    """Make the next call of ``owner.name`` in this process raise ``Injected``."""
    real = getattr(owner, name)
    armed = {"on": False, "fired": 0}

    def faulty(*args, **kwargs):
        if armed["on"] and when == "before":
            armed["on"], armed["fired"] = False, armed["fired"] + 1
            raise Injected
        out = real(*args, **kwargs)
        if armed["on"]:
            armed["on"], armed["fired"] = False, armed["fired"] + 1
            raise Injected
        return out

    monkeypatch.setattr(owner, name, faulty)
    return armed


@pytest.mark.parametrize("owner,name,when", STEPS, ids=[f"{s[1]}-{s[2]}" for s in STEPS])
def test_exception_inside_next_leaves_the_batch_undrawn(
    model_dir, docs, reference, monkeypatch, tmp_path, owner, name, when
):
    """Interrupted at that step of the 4th batch, with the monitor on (TensorBoard at every batch)
    and the device hand-over in the chain: the same iterator, continued, serves exactly the pass,
    and a state saved in the handler resumes to exactly the pass. Before, the rows left the buffer
    before the monitor ran, so a Ctrl-C there lost the batch."""
    normalize = "sqrt_d" if owner is Normalization else None

    def loader():
        stream = actvpipe.stream(model_dir, docs, context_length=CTX, generation_batch_size=4)
        buffered = stream.buffer(
            600, normalize=normalize, stats_rows=500, log_dir=tmp_path, progress=False, refresh_interval=0
        )
        return buffered.batch(BATCH, with_tokens=True, device="cpu")

    with loader() as plain:
        scale = plain.normalization
        armed = arm(monkeypatch, owner, name, when)
        it = iter(plain)
        served = [next(it) for _ in range(3)]
        armed["on"] = True
        with pytest.raises(Injected):
            next(it)
        assert armed["fired"] == 1
        state = pickle.loads(pickle.dumps(plain.state_dict()))
        continued = served + list(it)
    with loader() as resumed:
        resumed.load_state_dict(state)
        rest = list(resumed)
    if scale is not None:  # compare raw rows: undo the served normalisation
        for batch in (*continued, *rest):
            batch.acts.div_(scale.scale)
    assert_exact_batches(continued, reference, CTX)
    assert_exact_batches(served + rest, reference, CTX)


def test_close_in_the_middle_of_a_forward_does_not_wait_for_it(model_dir, texts):
    """A block of 512 contexts of 128 tokens takes the tiny model over a second here; ``close()``
    kills the generator inside it instead of waiting. (How fast a close is, is measured by
    ``benchmarks.scale``; here the bound only tells waiting from not waiting.)"""
    loader = actvpipe.stream(model_dir, texts * 20, context_length=128, generation_batch_size=512)
    loader = loader.buffer(200_000).batch(BATCH)
    loader.start()
    pid = loader.generator_pid
    deadline = time.monotonic() + 120
    while loader.counters()["computed"] == 0:  # the first forward is done: the second is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    began = time.monotonic()
    loader.close()
    took = time.monotonic() - began
    assert took < 0.5, f"close() took {took * 1000:.0f} ms: it waited for the forward"
    assert gone(pid) and not shm_entries(os.getpid())


def test_a_generator_reading_files_creates_no_named_semaphore(model_dir, texts, tmp_path):
    """``datasets`` takes tqdm's lock when it loads files; in a generator that lock must not be a
    named semaphore in /dev/shm, which a killed generator would leave behind."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]))
    before = sem_entries()
    loader = actvpipe.stream(model_dir, str(data), context_length=CTX).buffer(1000).batch(BATCH)
    with pytest.raises(actvpipe.GeneratorError), loader:
        it = iter(loader)
        next(it)
        assert sem_entries() <= before
        os.kill(loader.generator_pid, 9)
        for _ in it:
            pass
    assert sem_entries() <= before
