"""The buffer protocol and the mixing policy alone: property tests on a real shared buffer, with the
trainer's ledger on one side and the generator's ring operations on the other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actvpipe
from actvpipe.ledger import Ledger, initial_grants
from actvpipe.mixing import Mixing, Observed
from actvpipe.shm import PARALLEL_GATHER_BYTES, GeneratorView, SharedBlock, TrainerView

SIZE = 16


def locations(block: SharedBlock, ledger: Ledger, held: list[list[int]]) -> list[int]:
    """Every slot, once per place it is in: pool, free rings, claimed by a source, FIFOs, full list."""
    c, trainer = ledger.counts, ledger.buffer
    out = [*ledger.pool[: c.pool].tolist(), *range(c.fresh, block.size)]
    for k in range(block.n_sources):
        claimed = trainer.claimed(k)
        out += block.free_slots(k, claimed, c.granted[k] - claimed).tolist()
        out += held[k]
        out += block.fifos[k][np.arange(c.published[k], trainer.written(k)) % block.size].tolist()
    return out + block.full[: c.n_full].tolist()


operations = st.lists(
    st.tuples(
        st.sampled_from(["claim", "push", "publish", "serve", "grant"]), st.integers(0, 1), st.integers(1, 9)
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(operations, st.integers(1, 2), st.lists(st.integers(0, SIZE), min_size=2, max_size=2))
def test_every_slot_is_in_exactly_one_place_after_any_interleaving(ops, n_sources, caps):
    buffer = SharedBlock.create(SIZE, (1, 1, 2), torch.float32, n_sources)
    sources = [GeneratorView(buffer, k) for k in range(n_sources)]
    try:
        caps = caps[:n_sources]
        ledger = Ledger(TrainerView(buffer), caps, [0] * n_sources, [0] * n_sources)
        assert not any(ring.any() for ring in buffer.free_rings), "handing out the first slots wrote nothing"
        held: list[list[int]] = [[] for _ in range(n_sources)]
        rng = np.random.default_rng(0)
        for op, k, n in ops:
            k = k % n_sources
            if op == "claim":
                held[k] += sources[k].claim(n).tolist()
            elif op == "push":
                sources[k].push(np.array(held[k], dtype=np.int64), None)
                held[k] = []
            elif op == "publish":
                ledger.publish(k, n)
            elif op == "serve":
                ledger.remove(ledger.draw(n, rng))
            else:
                ledger.grant()
            where = locations(buffer, ledger, held)
            assert sorted(where) == list(range(SIZE)), f"after {op}: {sorted(where)}"
            granted = ledger.counts.granted[k] - ledger.counts.published[k]
            assert op != "grant" or granted <= max(ledger.caps[k], initial_grants(caps, SIZE)[k])
    finally:
        buffer.unlink()


def test_a_finished_source_gives_back_the_slots_it_did_not_use():
    buffer = SharedBlock.create(SIZE, (1, 1, 2), torch.float32, 2)
    try:
        ledger = Ledger(TrainerView(buffer), [SIZE, 6], [0, 0], [0, 0])
        assert initial_grants([SIZE, 6], SIZE) == [10, 6]
        disk = GeneratorView(buffer, 1)
        disk.push(disk.claim(2), None)
        disk.finish()
        ledger.grant()
        assert ledger.counts.granted[1] == 2 and ledger.counts.granted[0] == SIZE - 2
    finally:
        buffer.unlink()


sizes = st.tuples(st.integers(10, 400), st.floats(0.05, 0.95)).map(lambda t: (t[0], max(1, int(t[0] * t[1]))))
observed = st.tuples(
    st.integers(0, 400),
    st.integers(0, 400),
    st.integers(0, 400),
    st.booleans(),
    st.booleans(),
    st.integers(0, 5000),
)


@given(sizes, st.floats(0.0, 1.0), observed)
def test_deterministic_shares_fit_the_free_slots(size_fill, fraction, seen):
    """Each top-up takes exactly what the warm-up fill lacks, and the caps sum to at most the slots
    not sampleable, so every source can hold its share at once (no source starves another)."""
    size, min_fill = size_fill
    fill = seen[0] % (min_fill + 1)
    mixing = Mixing(size, min_fill, 2, fraction, deterministic=True, disk_rows=10**6)
    pending, done = (seen[1], seen[2]), (seen[3], seen[4])
    decision = mixing.decide(Observed(fill, pending, done, (seen[5], seen[5] // 3)))
    assert sum(decision.caps) <= size - fill
    if decision.allowances is not None:
        assert sum(decision.allowances) == min_fill - fill or any(done)
        assert all(a >= 0 for a in decision.allowances)
        assert all(done[k] or pending[k] >= a for k, a in enumerate(decision.allowances))


@given(sizes, st.floats(0.0, 1.0), observed)
def test_disk_rows_stay_within_their_fraction(size_fill, fraction, seen):
    """Beyond the warm-up fill, publishing what the policy allows keeps disk rows at most
    ``fraction`` of all rows, unless the live source is exhausted or disk rows fill every free slot."""
    size, min_fill = size_fill
    fill = seen[0] % (size + 1)
    mixing = Mixing(size, min_fill, 2, fraction, disk_rows=10**6)
    pending, done = (seen[1], seen[2]), (seen[3], seen[4])
    published = (seen[5], min(seen[5] // 2, int(fraction * seen[5]) + min_fill))
    decision = mixing.decide(Observed(fill, pending, done, published))
    live, disk = (min(a, p) for a, p in zip(decision.allowances, pending, strict=True))
    live_exhausted = done[0] and pending[0] == live
    rescue = fill + live < min_fill and pending[1] >= size - fill - live
    if not (live_exhausted or rescue):
        assert published[1] + disk <= int(fraction * (sum(published) + live)) + min_fill or disk == 0


def test_disk_rows_fill_the_buffer_first():
    mixing = Mixing(100, 50, 2, 0.3, disk_rows=1000)
    assert mixing.initial_caps((0, 0)) == (50, 25), "the live source leaves the warm-up's room"
    waiting = mixing.decide(Observed(0, (80, 10), (False, False), (0, 10)))
    assert waiting.allowances[0] == 0, "no live row before the warm-up's disk rows"
    after = mixing.decide(Observed(50, (80, 10), (False, False), (0, 50)))
    assert after.allowances[0] == 100 and after.caps[0] == 100


def test_one_source_publishes_everything_or_exactly_the_warmup_gap():
    assert Mixing(100, 50).decide(Observed(10, (70,), (False,), (0,))).allowances == (100,)
    assert Mixing(100, 50, deterministic=True).decide(Observed(10, (70,), (False,), (0,))).allowances == (40,)


def test_the_serving_benchmark_serves_its_cache_through_the_loader(tmp_path):
    """benchmarks/serving.py times the loader's own ``next()`` on a cache it writes: the cache holds
    the rows it says, and a window from a full buffer serves batches of them."""
    from benchmarks.serving import cache_file, loader_window

    path = cache_file(tmp_path / "rows.h5", 300, (2, 2, 4))
    stream = actvpipe.from_hdf5(path)
    with stream.buffer(100).batch(10, with_tokens=True) as loader:
        batches = iter(loader)
        assert loader_window(loader, batches, 100, 10, 5) > 0
        served = [next(batches) for _ in range(3)]
    rows = torch.cat([b.acts for b in served])
    expected = torch.randn((300, 2, 2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(rows, expected[torch.cat([b.seq for b in served])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_gather_copies_exactly_the_slots_rows_on_the_callers_threads(dtype, threads):
    """Batches of at least ``PARALLEL_GATHER_BYTES`` go through ``index_select`` on torch's threads,
    smaller ones through numpy on this thread: either way the rows of the slots, in their order, for
    any dtype, and the caller's thread count is left as it was."""
    row = (2, 12, 768)
    row_bytes = int(np.prod(row)) * torch.empty((), dtype=dtype).element_size()
    large = -(-PARALLEL_GATHER_BYTES // row_bytes)
    block = SharedBlock.create(2 * large, row, dtype)
    before = torch.get_num_threads()
    try:
        block.rows.copy_(torch.randn(block.rows.shape).to(dtype))
        buffer = TrainerView(block)
        torch.set_num_threads(threads)
        for n in (large, 7):  # the parallel path (with 2 threads), the one-thread path
            slots = np.random.default_rng(n).permutation(2 * large)[:n]
            out = torch.empty((n, *row), dtype=dtype)
            assert buffer.gather(slots, out) is out
            assert torch.equal(out, block.rows[torch.from_numpy(slots)])
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
        block.unlink()
