"""Rows of any number of capture points: served, cached, read back, interleaved, normalised and
resumed as ``[k, n_layers, d_model]``, each point equal to an independent forward hook."""

from __future__ import annotations

import h5py
import pytest
import torch
from conftest import reference_contexts, resumed_run
from transformers import AutoModel

import actvpipe

CTX = 32
THREE = ("resid_pre", "attn_out", "mlp_out")


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:6]


@pytest.fixture(scope="module")
def reference(model_dir, docs) -> dict[str, torch.Tensor]:
    """Each point ``[n_ctx, ctx, n_layers, d]`` of the demo GPT-2 model by plain hooks."""
    contexts = reference_contexts(model_dir, docs, CTX)
    model = AutoModel.from_pretrained(model_dir).eval()
    saved = {}
    for i, block in enumerate(model.h):
        block.register_forward_pre_hook(lambda m, a, i=i: saved.__setitem__(("resid_pre", i), a[0]))
        block.attn.register_forward_hook(lambda m, a, o, i=i: saved.__setitem__(("attn_out", i), o[0]))
        block.mlp.register_forward_hook(lambda m, a, o, i=i: saved.__setitem__(("mlp_out", i), o))
        block.register_forward_hook(
            lambda m, a, o, i=i: saved.__setitem__(("resid_post", i), o[0] if isinstance(o, tuple) else o)
        )
    out = {name: [] for name in (*THREE, "resid_post")}
    with torch.no_grad():
        for ctx in contexts:
            model(ctx[None])
            for name in out:
                out[name].append(torch.stack([saved[(name, i)][0] for i in range(4)], 1))
    return {"contexts": contexts, **{name: torch.stack(v) for name, v in out.items()}}


def expected_rows(reference, capture, seq, pos) -> torch.Tensor:
    return torch.stack([reference[p][seq, pos] for p in capture], 1)


def test_three_points_through_a_cache_file_and_back(model_dir, docs, reference, tmp_path):
    stream = actvpipe.stream(model_dir, docs, context_length=CTX, capture=THREE)
    path = stream.to_hdf5(tmp_path / "three.h5", progress=False)
    with h5py.File(path, "r") as f:
        acts = torch.from_numpy(f["activations"][:])
        seq, pos = torch.from_numpy(f["seq"][:]), torch.from_numpy(f["pos"][:])
        assert f["stats/mean"].shape == (3, 4, 64) and f["stats/mean_norm"].shape == (3, 4)
    assert acts.shape[1:] == (3, 4, 64)
    torch.testing.assert_close(acts, expected_rows(reference, THREE, seq, pos), rtol=1e-4, atol=1e-5)

    cached = actvpipe.from_hdf5(path)
    assert cached.row_shape == (3, 4, 64)
    with cached.buffer(2000).batch(500, with_tokens=True) as loader:
        batches = list(loader)
    got = torch.cat([b.acts for b in batches])
    seq, pos = torch.cat([b.seq for b in batches]), torch.cat([b.pos for b in batches])
    assert len(got) == len(acts)
    torch.testing.assert_close(got, expected_rows(reference, THREE, seq, pos), rtol=1e-4, atol=1e-5)

    # Interleaved with a live stream of the same points: both sources' rows, each once, exact.
    mixed = stream.buffer(2000, hdf5=path)
    with mixed.batch(500, with_tokens=True) as loader:
        batches = list(loader)
    sources = torch.cat([b.source for b in batches])
    assert (sources == 0).sum() == (sources == 1).sum() == len(acts)
    seq, pos = torch.cat([b.seq for b in batches]), torch.cat([b.pos for b in batches])
    got = torch.cat([b.acts for b in batches])
    torch.testing.assert_close(got, expected_rows(reference, THREE, seq, pos), rtol=1e-4, atol=1e-5)


def test_files_of_other_capture_lists_refuse_to_mix(model_dir, docs, tmp_path):
    one = actvpipe.stream(model_dir, docs[:2], context_length=CTX, capture=("resid_post",))
    path = one.to_hdf5(tmp_path / "one.h5", max_rows=100, progress=False)
    default = actvpipe.stream(model_dir, docs[:2], context_length=CTX)
    other = default.to_hdf5(tmp_path / "two.h5", max_rows=100, progress=False)
    both = r"\['resid_post'\] vs \['resid_mid', 'mlp_out'\]"
    with pytest.raises(ValueError, match=both):
        default.buffer(1000, hdf5=path)
    with pytest.raises(
        ValueError, match=r"one.h5' does not match the first file .*two.h5': capture: " + both
    ):
        actvpipe.from_hdf5([other, path])


def test_one_point_normalised_and_resumed_exactly(model_dir, docs, reference):
    capture = ("resid_post",)

    def make_loader():
        stream = actvpipe.stream(model_dir, docs, context_length=CTX, capture=capture)
        return stream.buffer(600, normalize="standardize", stats_rows=500).batch(100, with_tokens=True)

    batches, _ = resumed_run(make_loader, 7)
    with make_loader() as loader:
        norm = loader.normalization
    assert norm.shift.shape == (1, 4, 64)
    seq, pos = torch.cat([b.seq for b in batches]), torch.cat([b.pos for b in batches])
    keys = torch.sort(seq * CTX + pos).values
    every = torch.arange(len(reference["contexts"]) * CTX).view(-1, CTX)[:, 1:].reshape(-1)
    assert torch.equal(keys, every), "lost or duplicated rows"
    raw = expected_rows(reference, capture, seq, pos)
    got = torch.cat([b.acts for b in batches])
    torch.testing.assert_close(got, (raw - norm.shift) * norm.scale, rtol=1e-4, atol=1e-4)
