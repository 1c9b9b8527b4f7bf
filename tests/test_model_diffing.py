"""Model diffing: several models' activations at the same token in one row ``[n_models, k, n_layers,
d_model]``, one shuffle, exact against independent hooks on each model, through resume, files,
statistics and interleaving; mismatched models refused before any work."""

from __future__ import annotations

import h5py
import pytest
import torch
from conftest import reference_pass, resumed_run
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

import actvpipe

CTX = 32


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:6]


def save_variant(model_dir, path, tokenizer=None, **config_overrides):
    """The demo model with perturbed weights, or a fresh model of another shape, with a tokenizer."""
    if config_overrides:
        config = GPT2Config.from_pretrained(model_dir, **config_overrides)
        torch.manual_seed(2)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    (tokenizer or AutoTokenizer.from_pretrained(model_dir)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory, model_dir):
    return save_variant(model_dir, tmp_path_factory.mktemp("tuned"))


@pytest.fixture(scope="module")
def references(model_dir, tuned_dir, docs):
    """Each model's (contexts, rows [n_ctx, ctx, 2, n_layers, d]) from plain forward hooks."""
    return [reference_pass(path, docs, CTX) for path in (model_dir, tuned_dir)]


def assert_rows_of_each_model(batches, references, source: int | None = None) -> None:
    """Every row of the pass once (of ``source`` only, when given), each model's slot equal to that
    model's reference."""
    seq, pos, acts, src = (
        torch.cat([getattr(b, f) for b in batches]) for f in ("seq", "pos", "acts", "source")
    )
    if source is not None:
        seq, pos, acts = seq[src == source], pos[src == source], acts[src == source]
    contexts, _ = references[0]
    keys = torch.sort(seq * CTX + pos).values
    every = torch.arange(len(contexts) * CTX).view(-1, CTX)[:, 1:].reshape(-1)
    assert torch.equal(keys, every), "lost or duplicated rows"
    assert acts.shape[1:] == (2, 2, 4, 64)
    for m, (_, rows) in enumerate(references):
        torch.testing.assert_close(acts[:, m], rows[seq, pos], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_hold_every_model_at_the_same_token_across_a_resume(
    model_dir, tuned_dir, docs, references, deterministic
):
    def make_loader():
        stream = actvpipe.stream(
            [model_dir, tuned_dir], docs, context_length=CTX, deterministic=deterministic
        )
        return stream.buffer(800).batch(100, with_tokens=True)

    assert make_loader().spec.row_shape == (2, 2, 4, 64)
    batches, _ = resumed_run(make_loader, 6)
    assert_rows_of_each_model(batches, references)
    # The two models really differ: the pair is not one model twice.
    assert not torch.allclose(references[0][1], references[1][1], atol=1e-3)


def test_files_statistics_and_interleaving_carry_the_models_axis(
    model_dir, tuned_dir, docs, references, tmp_path
):
    stream = actvpipe.stream([model_dir, tuned_dir], docs, context_length=CTX)
    path = stream.to_hdf5(tmp_path / "pair.h5", progress=False)
    with h5py.File(path, "r") as f:
        assert f["activations"].shape[1:] == (2, 2, 4, 64)
        assert f.attrs["n_models"] == 2
        assert list(f.attrs["model"]) == [str(model_dir), str(tuned_dir)]
        assert f["stats/mean"].shape == (2, 2, 4, 64) and f["stats/mean_norm"].shape == (2, 2, 4)
    cached = actvpipe.from_hdf5(path)
    assert cached.row_shape == (2, 2, 4, 64)
    with stream.buffer(3000, hdf5=path).batch(500, with_tokens=True) as loader:
        batches = list(loader)
    for source in (0, 1):  # live rows and file rows: each row once from each, exact
        assert_rows_of_each_model(batches, references, source)
    # Statistics per model: those of each model streamed alone.
    both = stream.stats(rows=2000)
    for m, each in enumerate((model_dir, tuned_dir)):
        alone = actvpipe.stream(each, docs, context_length=CTX).stats(rows=2000)
        torch.testing.assert_close(both.mean[m], alone.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.std[m], alone.std, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.mean_norm[m], alone.mean_norm, rtol=1e-5, atol=1e-6)
    single = actvpipe.stream(model_dir, docs, context_length=CTX)
    with pytest.raises(ValueError, match="n_models: 2 vs 1"):
        single.buffer(1000, hdf5=path)


def test_mismatched_models_are_refused_before_any_work(model_dir, tuned_dir, docs, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<extra-token>"])
    other_vocab = save_variant(model_dir, tmp_path / "vocab", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"different tokenizers: their vocabularies differ \(2,048 vs 2,049"):
        actvpipe.stream([model_dir, other_vocab], docs, context_length=CTX)
    given = actvpipe.stream([model_dir, other_vocab], docs, context_length=CTX, tokenizer=str(model_dir))
    assert given.spec.n_models == 2

    narrow = save_variant(model_dir, tmp_path / "narrow", n_embd=32)
    with pytest.raises(ValueError, match=r"has d_model 64 but .*narrow' has 32"):
        actvpipe.stream([model_dir, narrow], docs, context_length=CTX)

    deeper = save_variant(model_dir, tmp_path / "deeper", n_layer=6)
    with pytest.raises(ValueError, match=r"has 4 layers but .*deeper' has 6; pass layers="):
        actvpipe.stream([model_dir, deeper], docs, context_length=CTX)
    common = actvpipe.stream([model_dir, deeper], docs, context_length=CTX, layers=[1, 3])
    assert common.row_shape == (2, 2, 2, 64)
    with pytest.raises(ValueError, match="layers"):
        actvpipe.stream([model_dir, deeper], docs, context_length=CTX, layers=[5])
    with pytest.raises(ValueError, match="model: an empty list"):
        actvpipe.stream([], docs, context_length=CTX)
