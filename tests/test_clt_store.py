"""The cross-layer-transcoder store honours crosslayer-coding's ``BaseActivationStore`` contract:
per-layer inputs (resid_mid) and targets (mlp_out) of the same tokens, normalisation statistics its
loss un-normalises with, and exact resume through ``state_dict``."""

from __future__ import annotations

import pytest
import torch

import actvpipe
from actvpipe.integrations.clt import ActivationStore

CTX, BATCH = 64, 256


def loader_of(model_dir, texts, **buffer):
    stream = actvpipe.stream(model_dir, texts[:8], context_length=CTX, deterministic=True)
    return stream.buffer(3000, **buffer).batch(BATCH)


def test_the_store_meets_the_contract_and_splits_rows_by_layer(model_dir, texts):
    """What crosslayer-coding's trainer and ``BaseActivationStore`` read, and each batch's columns
    against the same deterministic loader's rows."""
    store = ActivationStore(loader_of(model_dir, texts))
    assert (store.layer_indices, store.d_model, store.dtype) == ([0, 1, 2, 3], 64, torch.float32)
    assert (store.train_batch_size_tokens, store.device, store.apply_normalization) == (
        BATCH,
        torch.device("cpu"),
        False,
    )
    assert store.mean_tg == store.std_tg == store.mean_in == store.std_in == {}
    assert iter(store) is store
    with loader_of(model_dir, texts) as plain:
        rows = [b for b, _ in zip(plain, range(5), strict=False)]
    got = [store.get_batch(), next(store), *(next(store) for _ in range(3))]
    for (inputs, targets), row in zip(got, rows, strict=True):
        assert sorted(inputs) == sorted(targets) == [0, 1, 2, 3]
        for layer in range(4):
            assert torch.equal(inputs[layer], row[:, 0, layer]) and torch.equal(
                targets[layer], row[:, 1, layer]
            )
    store.close()


@pytest.mark.parametrize("kind", ["standardize", "sqrt_d"])
def test_normalised_batches_un_normalise_to_the_raw_rows_with_mean_and_std(model_dir, texts, kind):
    """``(x - mean_tg) / std_tg`` is what the store serves: un-normalised as crosslayer-coding's loss
    does (``x * std + mean``) it gives the raw rows."""
    store = ActivationStore(loader_of(model_dir, texts, normalize=kind))
    assert store.apply_normalization and sorted(store.mean_tg) == [0, 1, 2, 3]
    assert store.mean_tg[2].shape == store.std_in[2].shape == (1, 64)
    inputs, targets = store.get_batch()
    store.close()
    with loader_of(model_dir, texts) as plain:
        raw = next(iter(plain))
    for layer in range(4):
        torch.testing.assert_close(
            targets[layer] * store.std_tg[layer] + store.mean_tg[layer], raw[:, 1, layer]
        )
        torch.testing.assert_close(
            inputs[layer] * store.std_in[layer] + store.mean_in[layer], raw[:, 0, layer]
        )


def test_a_restored_store_continues_with_the_next_batch(model_dir, texts, tmp_path):
    first = ActivationStore(loader_of(model_dir, texts))
    for _ in range(3):
        first.get_batch()
    # As crosslayer-coding's CheckpointManager saves and loads it (weights_only, map_location).
    torch.save(first.state_dict(), tmp_path / "store.pt")
    state = torch.load(tmp_path / "store.pt", weights_only=True, map_location="cpu")
    expected = first.get_batch()
    first.close()
    second = ActivationStore(loader_of(model_dir, texts))
    second.load_state_dict(state)
    got = second.get_batch()
    second.close()
    for side in range(2):
        assert all(torch.equal(got[side][k], expected[side][k]) for k in expected[side])
    with pytest.raises(ValueError, match=r"not by actvpipe's ActivationStore"):
        second.load_state_dict({"store_type": "local", "epoch": 0})
