"""Disk rows mixed into a live stream for the whole pass: exactly once each, rationed, resumable."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import assert_exact_rows, reference_pass, resumed_run

import actvpipe
from actvpipe.loader_state import LoaderState

CTX = 32


@pytest.fixture(scope="module")
def live_docs(texts):
    return texts[:6]


@pytest.fixture(scope="module")
def disk_file(tmp_path_factory, model_dir, texts):
    path = tmp_path_factory.mktemp("mix") / "disk.h5"
    return actvpipe.stream(model_dir, texts[6:12], context_length=CTX).to_hdf5(path, progress=False)


@pytest.fixture(scope="module")
def live_reference(model_dir, live_docs):
    return reference_pass(model_dir, live_docs, CTX)


@pytest.fixture(scope="module")
def disk_reference(model_dir, texts):
    return reference_pass(model_dir, texts[6:12], CTX)


def assert_each_source_exact(batches, live_reference, disk_reference) -> None:
    """Every live row and every file row exactly once, each equal to its independent reference."""
    source, seq, pos, acts = (
        torch.cat([getattr(b, f) for b in batches]) for f in ("source", "seq", "pos", "acts")
    )
    for k, reference in enumerate((live_reference, disk_reference)):
        mine = source == k
        assert_exact_rows(seq[mine], pos[mine], acts[mine], reference, CTX)


def disk_rows(path) -> int:
    return actvpipe.from_hdf5(path).spec.files[0].rows


def mixed(model_dir, docs, disk_file, size=600, fraction=None, deterministic=False):
    stream = actvpipe.stream(model_dir, docs, context_length=CTX, deterministic=deterministic)
    return stream.buffer(size, hdf5=disk_file, hdf5_fraction=fraction).batch(50, with_tokens=True)


def test_every_live_and_every_file_row_once(model_dir, live_docs, disk_file, live_reference, disk_reference):
    with mixed(model_dir, live_docs, disk_file) as loader:
        batches = list(loader)
    assert_each_source_exact(batches, live_reference, disk_reference)
    assert (batches[0].source == 1).any(), "disk rows fill the buffer first"


def test_hdf5_fraction_rations_disk_rows(model_dir, live_docs, disk_file):
    size, fraction = 600, 0.2
    with mixed(model_dir, live_docs, disk_file, size, fraction) as loader:
        batches = list(loader)
    sources = torch.cat([b.source for b in batches]).float()
    live_total = int((sources == 0).sum())
    served_disk = torch.cumsum(sources, 0)
    served = torch.arange(1, len(sources) + 1)
    # While live rows remain, disk rows stay within the fraction plus the warm-up credit.
    live_left = live_total - torch.cumsum(1 - sources, 0)
    while_live = live_left > size
    assert (served_disk[while_live] <= fraction * served[while_live] + size).all()
    assert (sources == 1).sum() == disk_rows(disk_file), "the rest of the disk rows still come"


@pytest.mark.parametrize("midpoint", [3, 40])
def test_interleaved_resume_is_exact(
    model_dir, live_docs, disk_file, live_reference, disk_reference, midpoint
):
    with mixed(model_dir, live_docs, disk_file, fraction=0.3) as loader:
        it = iter(loader)
        first = [next(it) for _ in range(midpoint)]
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert len(LoaderState.from_dict(state).buffer.frontiers) == 2
    fresh = mixed(model_dir, live_docs, disk_file, fraction=0.3)
    fresh.load_state_dict(state)
    with fresh:
        rest = list(fresh)
    assert_each_source_exact(first + rest, live_reference, disk_reference)


def test_interleaving_checks_its_inputs(tmp_path, model_dir, live_docs, disk_file):
    stream = actvpipe.stream(model_dir, live_docs, context_length=CTX)
    with pytest.raises(ValueError, match=r"disk.h5.*does not match this stream.*layers"):
        actvpipe.stream(model_dir, live_docs, context_length=CTX, layers=[0, 1]).buffer(100, hdf5=disk_file)
    with pytest.raises(ValueError, match=r"disk.h5.*does not match this stream.*dtype"):
        actvpipe.stream(model_dir, live_docs, context_length=CTX, dtype=torch.float64).buffer(
            100, hdf5=disk_file
        )
    with pytest.raises(ValueError, match=r"hdf5_fraction"):
        stream.buffer(100, hdf5=disk_file, hdf5_fraction=1.5)
    with pytest.raises(FileNotFoundError, match=r"missing\.h5"):
        stream.buffer(100, hdf5=tmp_path / "missing.h5")
    with pytest.raises(ValueError, match=r"deterministic=True.*pass hdf5_fraction="):
        actvpipe.stream(model_dir, live_docs, context_length=CTX, deterministic=True).buffer(
            100, hdf5=disk_file
        )


def test_deterministic_interleaving_replays_and_resumes_bitwise(
    model_dir, live_docs, disk_file, live_reference, disk_reference
):
    def loader():
        return mixed(model_dir, live_docs, disk_file, fraction=0.3, deterministic=True)

    with loader() as whole:
        run = list(whole)
    replay, _ = resumed_run(loader, 7)
    assert len(replay) == len(run)
    for a, b in zip(run, replay, strict=True):
        assert torch.equal(a.acts, b.acts) and torch.equal(a.source, b.source) and torch.equal(a.seq, b.seq)
    assert_each_source_exact(run, live_reference, disk_reference)
