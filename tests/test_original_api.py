"""The original design's API and the embedded offline default."""

from __future__ import annotations

import os

import pytest
import torch

import actvpipe
from actvpipe.config import demo_config


def test_test_config_loader_is_a_context_manager_over_the_embedded_default():
    with actvpipe.actvs_loader_from_test_config(batch_size=256) as loader:
        batch = next(iter(loader))
        assert loader.generator_pid is not None
    assert batch.shape == (256, 2, 4, 64) and batch.dtype == torch.float32
    assert loader.generator_pid is None


def test_config_is_checked_against_the_model():
    config = demo_config()
    config.activation_dim, config.n_layers = 768, 12
    with pytest.raises(
        ValueError, match=r"activation_dim=768 but the model has 64; n_layers=12 but the model has 4"
    ):
        actvpipe.actvs_loader_from_config(config, batch_size=10)


def test_config_fields_reach_the_stream():
    config = demo_config()
    config.buffer_size, config.max_sequence_length, config.model_dtype = 3000, 40, torch.float64
    loader = actvpipe.actvs_loader_from_config(config, batch_size=50)
    assert (loader.buffer_size, loader.batch_size, loader.spec.context_length) == (3000, 50, 40)
    assert loader.spec.dtype == torch.float64
    with pytest.raises(ValueError, match="max_batch_size"):
        config.max_batch_size = 10
        actvpipe.actvs_loader_from_config(config, batch_size=50)


def test_production_config_offline_says_so():
    with pytest.raises(ValueError, match=r"openai-community/gpt2.*actvpipe\.demo_stream\(\)"):
        actvpipe.actvs_loader_from_production_config(
            batch_size=5000, buffer_size=1000, generation_batch_size=8
        )


def test_demo_model_is_saved_and_loaded_with_the_real_loading_path(model_dir):
    from transformers import AutoModel, AutoTokenizer

    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model_dir))
    model = AutoModel.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "gpt2" and model.config.n_layer == 4
    assert (
        tok.decode(tok("def f(x): return x", add_special_tokens=False)["input_ids"]) == "def f(x): return x"
    )


def test_demo_model_build_is_deterministic(tmp_path, model_dir):
    from safetensors.torch import load_file

    from actvpipe.demo import build_demo_model

    build_demo_model(tmp_path)
    fresh, cached = load_file(tmp_path / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert fresh.keys() == cached.keys()
    assert all(torch.equal(fresh[k], cached[k]) for k in fresh)
    assert (tmp_path / "tokenizer.json").read_text() == (model_dir / "tokenizer.json").read_text()
