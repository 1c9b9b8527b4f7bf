"""Pure pieces alone: packing, uniform sampling without replacement, dense removal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actvpipe.outputs import OutputPool
from actvpipe.slots import remove_positions, sample_positions
from actvpipe.text import RankNumbering, pack_contexts

BOS, EOS = 1000, 1001


EMPTY = np.zeros(0, dtype=np.int64)
docs_strategy = st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=30), max_size=12)


def pack(docs, ctx, carry=EMPTY, carry_start=(0, 0), first_record=0):
    records = list(range(first_record, first_record + len(docs)))
    return pack_contexts(docs, records, carry, carry_start, ctx, BOS, EOS)


@given(docs_strategy, st.integers(2, 9))
def test_packing_keeps_every_token_in_order(docs, ctx):
    contexts, starts, carry = pack(docs, ctx)
    stream = [t for d in docs for t in [*d, EOS]]
    assert contexts.shape == (len(stream) // (ctx - 1), ctx)
    assert starts.shape == (len(contexts) + 1, 2)
    assert (contexts[:, 0] == BOS).all(), "BOS is prepended, never written over a token"
    assert contexts[:, 1:].reshape(-1).tolist() + carry.tolist() == stream
    assert len(carry) < ctx - 1


@given(docs_strategy, st.integers(1, 5), st.integers(2, 7))
def test_packing_in_pieces_equals_packing_at_once(docs, cut, ctx):
    whole, whole_starts, whole_carry = pack(docs, ctx)
    first, starts, carry = pack(docs[:cut], ctx)
    second, more_starts, carry = pack(docs[cut:], ctx, carry, tuple(starts[-1]), first_record=cut)
    assert np.array_equal(np.concatenate([first, second]), whole)
    assert np.array_equal(np.concatenate([starts[:-1], more_starts]), whole_starts)
    assert np.array_equal(carry, whole_carry)


@given(docs_strategy, st.integers(2, 7), st.data())
def test_packing_from_a_start_point_reproduces_the_following_contexts(docs, ctx, data):
    contexts, starts, _ = pack(docs, ctx)
    c = data.draw(st.integers(0, len(contexts)))
    record, offset = (int(v) for v in starts[c])
    if record >= len(docs):
        assert c == len(contexts)
        return
    carry = np.array([*docs[record], EOS], dtype=np.int64)[offset:]
    again, again_starts, _ = pack(docs[record + 1 :], ctx, carry, (record, offset), first_record=record + 1)
    assert np.array_equal(again, contexts[c:])
    assert np.array_equal(again_starts, starts[c:])


@settings(max_examples=300)
@given(st.integers(0, 5000), st.integers(0, 3000), st.integers(0, 2**32), st.booleans())
def test_sample_positions_are_distinct_and_in_range(n, k, seed, with_scratch):
    scratch = np.full(n, 7, dtype=np.int32) if with_scratch else None  # stale contents must not matter
    picked = sample_positions(np.random.default_rng(seed), n, k, scratch)
    assert len(picked) == min(n, k)
    assert len(np.unique(picked)) == len(picked)
    assert picked.size == 0 or (picked.min() >= 0 and picked.max() < n)


@pytest.mark.parametrize(("n", "k"), [(20, 3), (20, 15), (1000, 10)])
@pytest.mark.parametrize("with_scratch", [False, True])
def test_sample_positions_are_uniform(n, k, with_scratch):
    rng = np.random.default_rng(0)
    counts = np.zeros(n)
    trials = 20_000
    scratch = np.zeros(n, dtype=np.int32) if with_scratch else None
    for _ in range(trials):
        counts[sample_positions(rng, n, k, scratch)] += 1
    expected = trials * k / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < n + 6 * np.sqrt(2 * n), f"chi-square {chi2:.0f} for {n - 1} degrees of freedom"


def test_sample_positions_with_repeats_drawn_again_make_every_set_equally_likely():
    """Not only each position: each of the C(12, 3) = 220 sets (repeats are frequent at n = 12)."""
    rng, scratch = np.random.default_rng(1), np.zeros(12, dtype=np.int32)
    sets = list(itertools.combinations(range(12), 3))
    counts = dict.fromkeys(sets, 0)
    trials = 44_000
    for _ in range(trials):
        counts[tuple(sorted(sample_positions(rng, 12, 3, scratch).tolist()))] += 1
    expected = trials / len(sets)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    dof = len(sets) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), f"chi-square {chi2:.0f} for {dof} degrees of freedom"


@settings(max_examples=300)
@given(st.integers(1, 300), st.data())
def test_remove_positions_keeps_exactly_the_others_dense(n, data):
    k = data.draw(st.integers(0, n))
    positions = np.array(data.draw(st.permutations(range(n)))[:k], dtype=np.int64)
    slots = np.arange(n) * 7
    before = slots.copy()
    remove_positions(slots, n, positions)
    kept = np.delete(before, positions)
    assert sorted(slots[: n - k].tolist()) == sorted(kept.tolist())


@settings(max_examples=200)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 40))
def test_rank_numbering_gives_each_rank_its_own_blocks(world_size, block, n_local):
    """Every rank's local context numbers map to distinct global ones (block ``b`` of rank ``r`` is
    global block ``b * world_size + r``) and back; together the ranks' full blocks tile 0..N."""
    numberings = [RankNumbering(r, world_size, block) for r in range(world_size)]
    seen = []
    for numbering in numberings:
        mapped = [numbering.to_global(i) for i in range(n_local)]
        assert [numbering.to_local(g) for g in mapped] == list(range(n_local))
        assert all((g // block) % world_size == numbering.rank for g in mapped)
        seen += mapped
    assert len(set(seen)) == len(seen)
    full = n_local // block * block
    tiled = sorted(numbering.to_global(i) for numbering in numberings for i in range(full))
    assert tiled == list(range(full * world_size))


def test_output_pool_reuses_a_tensor_only_once_nothing_references_it():
    holders = {
        "the batch": lambda t: t,
        "a slice": lambda t: t[2:5],
        "a numpy array": lambda t: t.numpy(),
        "a view of a view": lambda t: t.view(-1)[1:][::2],
    }
    for name, keep in holders.items():
        pool = OutputPool((8, 3), torch.float32, capacity=4)
        batch = pool.take(8)
        address = batch.data_ptr()
        held = keep(batch)
        del batch
        assert all(pool.take(8).data_ptr() != address for _ in range(3)), f"{name} still holds it"
        del held
        assert pool.take(8).data_ptr() == address, f"reused once {name} is gone"
    assert pool.take(5).shape == (5, 3)
