"""The age bound, ``.buffer(max_age=...)``: no row stays longer than the bound, every row is still
served once, a resume is exact (bitwise in deterministic mode), and a saved state needs only the last
~``max_age`` buffers' worth of blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_exact_batches, reference_pass, resumed_run

import actvpipe
from actvpipe.age_bound import AgeBound
from actvpipe.loader_state import LoaderState

CTX, GEN_BATCH, SIZE, BATCH = 32, 4, 600, 50


@pytest.fixture(scope="module")
def reference(model_dir, texts):
    return reference_pass(model_dir, texts, CTX)


def make_loader(model_dir, texts, max_age, deterministic=False):
    stream = actvpipe.stream(
        model_dir, texts, context_length=CTX, generation_batch_size=GEN_BATCH, deterministic=deterministic
    )
    return stream.buffer(SIZE, max_age=max_age).batch(BATCH, with_tokens=True)


def lags(batches) -> np.ndarray:
    """For each served row, rows served before its batch minus its row id. With one source and no
    excluded tokens a row's id is its publish index, so this bounds how long it stayed."""
    out, served = [], 0
    for batch in batches:
        ids = (batch.seq * (CTX - 1) + batch.pos - 1).numpy()
        out.append(served - ids)
        served += len(batch)
    return np.concatenate(out)


def test_no_row_stays_longer_than_the_bound_and_every_row_is_served_once(model_dir, texts, reference):
    """With ``max_age=1`` no row is served later than a buffer's worth of rows (plus two batches of
    backlog) after it was published; without the bound uniform sampling keeps many rows far longer,
    so the same check fails there (asserted, so this test can fail)."""
    with make_loader(model_dir, texts, max_age=1.0) as loader:
        bounded = list(loader)
    assert_exact_batches(bounded, reference, CTX)
    limit = SIZE + 2 * BATCH
    assert lags(bounded).max() <= limit
    with make_loader(model_dir, texts, max_age=None) as loader:
        uniform = list(loader)
    assert (lags(uniform) > limit).sum() > 50


def test_a_resume_with_the_bound_is_exact_and_bitwise_in_deterministic_mode(model_dir, texts, reference):
    """The saved state carries each buffered row's publish index; the restored run forces out the
    same rows at the same batches as the uninterrupted one (without them it draws other batches), and
    the saved rows come from the last ~max_age buffers only."""
    with make_loader(model_dir, texts, 1.0, deterministic=True) as loader:
        expected = list(loader)
    got, state = resumed_run(lambda: make_loader(model_dir, texts, 1.0, deterministic=True), 40)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.seq, b.seq) and torch.equal(a.pos, b.pos) and torch.equal(a.acts, b.acts)
    assert_exact_batches(got, reference, CTX)
    saved = LoaderState.from_dict(state).buffer
    ids = saved.buffered.numpy().astype(np.int64) + saved.buffered_base
    assert saved.buffered_published is not None and len(saved.buffered_published) == len(ids)
    assert saved.frontiers[0] - ids.min() <= 2 * SIZE + 2 * BATCH


def test_a_state_without_the_bound_is_refused_by_a_loader_with_it(model_dir, texts):
    with make_loader(model_dir, texts, None) as loader:
        next(iter(loader))
        state = loader.state_dict()
    bounded = make_loader(model_dir, texts, 2.0)
    with pytest.raises(ValueError, match=r"max_age: saved None, now 2\.0"):
        bounded.load_state_dict(state)


@pytest.mark.parametrize("max_age", [0, -1.0, True, "2", float("inf"), float("nan"), 33])
def test_a_bad_max_age_is_refused_before_any_work(model_dir, texts, max_age):
    stream = actvpipe.stream(model_dir, texts, context_length=CTX)
    with pytest.raises(ValueError, match=r"max_age: expected buffer turnovers in \(0, 32\]"):
        stream.buffer(SIZE, max_age=max_age)


def test_batch_positions_take_every_overdue_slot_and_draw_the_rest_uniformly():
    """Pure: ``AgeBound.positions`` returns distinct positions holding every overdue one, and the
    other positions are drawn uniformly (each within 15% of its expected count over 20,000 draws)."""
    n_full, count = 40, 8
    bound = AgeBound(n_full, max_rows=10)
    full = np.arange(n_full, dtype=np.int64)[::-1].copy()
    bound.published(full, 0, 0)
    over, _ = bound.overdue(total_published=n_full, count=count, full=full, n_full=n_full)
    assert np.array_equal(over, full[:count])  # the oldest first, capped at the batch
    rng = np.random.default_rng(0)
    scratch = np.empty(n_full, dtype=np.int32)
    hits = np.zeros(n_full)
    few = over[:3]
    for _ in range(20_000):
        positions = bound.positions(rng, n_full, few, count, scratch)
        assert len(np.unique(positions)) == count and positions.min() >= 0 and positions.max() < n_full
        assert set(bound.position[few]) <= set(positions.tolist())
        hits[positions] += 1
    others = np.setdiff1d(np.arange(n_full), bound.position[few])
    expected = 20_000 * (count - len(few)) / len(others)
    assert np.all(np.abs(hits[others] - expected) < 0.15 * expected)


def test_the_bookkeeping_matches_a_brute_force_model_and_a_rebuilt_one():
    """Pure, randomized: bursts of publications and batch removals over a small buffer. At every
    batch the overdue set equals a brute-force scan of every live row's publish index, the positions
    are distinct, and an ``AgeBound`` rebuilt from the live rows alone (what a restore has) finds the
    same overdue rows and draws the same positions from the same RNG state."""
    from actvpipe.slots import remove_positions

    size, batch, max_rows = 64, 8, 96
    rng, draws = np.random.default_rng(1), np.random.default_rng(2)
    bound, full = AgeBound(size, max_rows), np.zeros(size, dtype=np.int64)
    free, n_full, published = list(range(size)), 0, 0
    scratch = np.empty(size, dtype=np.int32)
    for step in range(3000):
        burst = int(rng.integers(0, min(len(free), 2 * batch) + 1))
        slots = np.array([free.pop() for _ in range(burst)], dtype=np.int64)
        full[n_full : n_full + burst] = slots
        bound.published(slots, published, n_full)
        n_full, published = n_full + burst, published + burst
        if n_full < batch:
            continue
        live = full[:n_full]
        oldest_first = live[np.argsort(bound.published_at[live])]
        expected = oldest_first[bound.published_at[oldest_first] < published - max_rows][:batch]
        over, pointer = bound.overdue(published, batch, full, n_full)
        assert np.array_equal(over, expected), step
        rebuilt = AgeBound(size, max_rows)
        rebuilt.restored(live.copy(), bound.published_at[live], 0)
        assert np.array_equal(rebuilt.overdue(published, batch, full, n_full)[0], over), step
        state = draws.bit_generator.state
        positions = bound.positions(draws, n_full, over, batch, scratch)
        again = np.random.default_rng()
        again.bit_generator.state = state
        assert np.array_equal(rebuilt.positions(again, n_full, over, batch, scratch), positions), step
        assert len(np.unique(positions)) == batch and set(bound.position[over]) <= set(positions.tolist())
        taken = full[positions].copy()
        remove_positions(full, n_full, positions)
        n_full -= batch
        bound.removed(positions, full, n_full)
        bound.oldest = pointer
        free.extend(taken.tolist())
        assert np.array_equal(bound.position[full[:n_full]], np.arange(n_full)), step
