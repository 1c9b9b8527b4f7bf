"""Served rows are exactly the documented rows: right values, every one once, nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import reference_contexts, reference_pass, reference_rows

import actvpipe

CTX = 64


@pytest.fixture(scope="module")
def reference(model_dir, texts):
    return reference_pass(model_dir, texts, CTX)


def collect(loader) -> actvpipe.TokenBatch:
    batches = list(loader)
    return actvpipe.TokenBatch(
        *(torch.cat([getattr(b, f) for b in batches]) for f in ("acts", "token_ids", "seq", "pos", "source"))
    )


@pytest.mark.parametrize("buffer_size", [300, 1_000_000], ids=["buffer<data", "buffer>data"])
def test_finite_pass_serves_each_documented_row_once(model_dir, texts, reference, buffer_size):
    contexts, rows = reference
    stream = actvpipe.stream(model_dir, texts, context_length=CTX, generation_batch_size=4)
    with stream.buffer(buffer_size).batch(128, with_tokens=True) as loader:
        got = collect(loader)
    n_ctx = len(contexts)
    assert len(got) == n_ctx * (CTX - 1)
    keys = got.seq * CTX + got.pos
    assert len(torch.unique(keys)) == len(keys), "a row was served twice"
    assert got.pos.min() == 1, "the BOS position must be excluded by default"
    order = torch.argsort(keys)
    expected_keys = torch.arange(n_ctx)[:, None] * CTX + torch.arange(1, CTX)[None, :]
    assert torch.equal(keys[order], expected_keys.reshape(-1))
    assert torch.equal(got.token_ids[order], contexts[:, 1:].reshape(-1))
    torch.testing.assert_close(
        got.acts[order], rows[:, 1:].reshape(-1, *rows.shape[2:]), rtol=1e-4, atol=1e-5
    )


def test_plain_batches_are_the_same_multiset_of_rows(model_dir, texts):
    """Without provenance, into pooled tensors: match rows by value (identical prefixes give identical
    rows, so by class)."""
    contexts = reference_contexts(model_dir, texts[:10], CTX)
    expected = reference_rows(model_dir, contexts)[:, 1:].reshape(len(contexts) * (CTX - 1), -1).double()
    stream = actvpipe.stream(model_dir, texts[:10], context_length=CTX, generation_batch_size=8)
    batches, pointers = [], []
    with stream.buffer(1000).batch(100) as loader:
        for batch in loader:
            pointers.append(batch.data_ptr())
            batches.append(batch.clone())
    # ``batch`` still holds the previous batch while the next is drawn, so two tensors take turns
    assert pointers[0] == pointers[2] != pointers[1] == pointers[3], "a dropped batch's memory is reused"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory: needs CUDA"):
            stream.buffer(1000).batch(100, pin_memory=True)
    assert [len(b) for b in batches[:-1]] == [100] * (len(batches) - 1)
    assert all(b.shape[1:] == (2, 4, 64) and b.dtype == torch.float32 for b in batches)
    got = torch.cat(batches).reshape(-1, expected.shape[1]).double()
    assert len(got) == len(expected)
    dist, nearest = torch.cdist(got, expected).min(dim=1)
    assert dist.max() < 1e-4
    same = torch.cdist(expected, expected) < 1e-4
    cls = same.int().argmax(dim=1)  # first row equal to each row: its class
    served_per_class = torch.bincount(cls[nearest], minlength=len(expected))
    assert torch.equal(served_per_class, torch.bincount(cls, minlength=len(expected)))


def test_a_batch_still_referenced_is_never_overwritten(model_dir, texts):
    """Batches kept whole, kept only as a numpy view of a slice, or dropped: the kept ones keep their
    values to the end of the pass, and the dropped ones' memory is reused."""
    stream = actvpipe.stream(model_dir, texts[:20], context_length=CTX, generation_batch_size=8)
    kept, views, copies, pointers = [], [], [], []
    with stream.buffer(1000).batch(50) as loader:
        for i, batch in enumerate(loader):
            copies.append(batch.clone())
            pointers.append(batch.data_ptr())
            if i % 3 == 0:
                kept.append((i, batch))
            elif i % 3 == 1:
                views.append((i, batch[10:20].numpy()))
    assert len(copies) >= 12
    for i, batch in kept:
        assert torch.equal(batch, copies[i])
    for i, view in views:
        assert np.array_equal(view, copies[i][10:20].numpy())
    dropped = range(2, len(pointers) - 2, 3)
    assert all(pointers[i] in pointers[i + 1 :] for i in dropped), "a dropped batch's memory is reused"


def test_drop_last_and_selected_layers(model_dir, texts, reference):
    rows = reference[1]
    stream = actvpipe.stream(model_dir, texts[:10], context_length=CTX, layers=[2, 0])
    n_rows = len(reference_contexts(model_dir, texts[:10], CTX)) * (CTX - 1)
    with stream.buffer(n_rows).batch(100, drop_last=True, with_tokens=True) as loader:
        got = collect(loader)
    assert len(got) == n_rows // 100 * 100
    assert got.acts.shape[1:] == (2, 2, 64)
    expected = rows[got.seq, got.pos][:, :, [0, 2]]
    torch.testing.assert_close(got.acts, expected, rtol=1e-4, atol=1e-5)


def test_include_bos_serves_position_zero(model_dir, texts, reference):
    rows = reference[1]
    stream = actvpipe.stream(model_dir, texts[:5], context_length=CTX, exclude_bos=False)
    with stream.buffer(10_000).batch(64, with_tokens=True) as loader:
        got = collect(loader)
    assert (got.pos == 0).sum() == got.seq.unique().numel()
    torch.testing.assert_close(got.acts, rows[got.seq, got.pos], rtol=1e-4, atol=1e-5)


def test_second_iteration_is_a_new_full_pass(model_dir, texts):
    loader = actvpipe.stream(model_dir, texts[:5], context_length=CTX).buffer(2000).batch(250)
    try:
        first = sum(len(b) for b in loader)
        second = sum(len(b) for b in loader)
    finally:
        loader.close()
    assert first == second > 0


def test_batches_are_shuffled_across_contexts(model_dir, texts):
    stream = actvpipe.stream(model_dir, texts, context_length=CTX)
    with stream.buffer(4000, warmup=1.0).batch(256, with_tokens=True) as loader:
        first = next(iter(loader))
    assert first.seq.unique().numel() > 20, "a batch must mix rows of many contexts"
