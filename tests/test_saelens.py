"""SAELens and TransformerLens: hook names map to our capture points, our rows equal TransformerLens'
``run_with_cache`` on the same weights, and SAELens' own trainers train from a loader and resume
exactly after a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference_contexts
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.multi_sae_trainer import MultiSAETrainer
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2LMHeadModel

import actvpipe
from actvpipe.hook_names import HOOK_POINTS, HookIndex, hook_name
from actvpipe.integrations import saelens

CTX = 64
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_saelens.py"


def hooked(model_dir) -> HookedTransformer:
    """The demo model's weights in a HookedTransformer, with no processing (SAELens loads models so)."""
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=c.n_embd,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer,
        n_ctx=c.n_positions,
        eps=c.layer_norm_epsilon,
        d_vocab=c.vocab_size,
        act_fn=c.activation_function,
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
        use_hook_mlp_in=True,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    return model.eval()


@pytest.fixture(scope="module")
def perturbed_dir(model_dir, tmp_path_factory):
    """The demo model with random layer-norm weights and biases (a fresh model's are 1 and 0, under
    which the points before and after a norm's weight and bias would be the same)."""
    from transformers import AutoTokenizer

    torch.manual_seed(2)
    hf = GPT2LMHeadModel.from_pretrained(model_dir)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("perturbed")
    hf.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    return path


def test_every_mapped_hook_name_serves_transformerlens_run_with_cache_rows(perturbed_dir, texts):
    """Each TransformerLens name we accept, at every layer: the rows served (by full names) equal
    ``run_with_cache`` of the same weights at the same (context, position), every row of the pass."""
    model_dir = perturbed_dir
    names = [f"blocks.{layer}.{short}" for short in HOOK_POINTS for layer in range(4)]
    docs = texts[:3]
    with (
        actvpipe.stream(model_dir, docs, context_length=CTX, capture=names)
        .buffer(4000)
        .batch(4000, with_tokens=True) as loader
    ):
        (batch,) = list(loader)
    assert loader.spec.capture == tuple(dict.fromkeys(HOOK_POINTS.values())) and loader.spec.layers == (
        0,
        1,
        2,
        3,
    )
    contexts = reference_contexts(model_dir, docs, CTX)
    with torch.no_grad():
        _, cache = hooked(model_dir).run_with_cache(contexts)
    assert sorted(zip(batch.seq.tolist(), batch.pos.tolist(), strict=True)) == [
        (s, p) for s in range(len(contexts)) for p in range(1, CTX)
    ]
    for name in names:
        ours = HookIndex.of(name, loader.spec).take(batch.acts)
        theirs = cache[name][batch.seq, batch.pos]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5, msg=name)


def test_hook_names_resolve_to_points_and_layers(model_dir, texts):
    def spec(**args):
        return actvpipe.stream(model_dir, texts[:2], context_length=CTX, **args).spec

    assert (spec(capture="hook_resid_post", layers=[2]).capture, spec(capture="hook_resid_post").layers) == (
        ("resid_post",),
        (0, 1, 2, 3),
    )
    both = spec(capture=["blocks.3.hook_mlp_out", "blocks.1.ln2.hook_normalized"])
    assert (both.capture, both.layers) == (("mlp_out", "mlp_in_normalized"), (1, 3))
    assert spec(capture=["resid_mid", "hook_mlp_out"]).capture == ("resid_mid", "mlp_out")
    assert hook_name("mlp_in_normalized", 2) == "blocks.2.ln2.hook_normalized"
    for bad, match in [
        ({"capture": "blocks.1.hook_attn_scores"}, r"no hook name actvpipe captures.*hook_mlp_out"),
        ({"capture": ["blocks.1.hook_mlp_out", "hook_resid_mid"]}, r"mixes full hook names"),
        ({"capture": "blocks.1.hook_mlp_out", "layers": [2]}, r"layers: \[2\] disagrees"),
        ({"capture": "blocks.9.hook_mlp_out"}, r"layers: \[9\] out of range; the model has layers 0..3"),
        ({"capture": "hook_attn_scores"}, r"or TransformerLens hook names"),
    ]:
        with pytest.raises(ValueError, match=match):
            spec(**bad)
    assert spec(capture=["blocks.3.hook_mlp_out", "blocks.1.hook_mlp_out"], layers=[3, 1]).layers == (1, 3)
    two = spec(capture=["hook_mlp_out"], layers=[1, 2])
    with pytest.raises(ValueError, match=r"name one, e.g. 'blocks.1.hook_mlp_out'"):
        saelens.data_provider(actvpipe.ActivationStream(two).buffer(100).batch(10), "hook_mlp_out")
    with pytest.raises(ValueError, match=r"not in these rows"):
        saelens.data_provider(actvpipe.ActivationStream(two).buffer(100).batch(10), "blocks.1.hook_resid_pre")


def test_a_transformerlens_name_for_another_point_on_this_architecture_is_refused(model_dir, texts, tmp_path):
    """Gemma 2's TransformerLens ``hook_mlp_out`` is after ``post_feedforward_layernorm``; our
    ``mlp_out`` is before it: the name is refused (our own name is not)."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"hook_mlp_out on gemma2 is taken after the MLP's post_feedforward"):
        actvpipe.stream(tmp_path, texts[:2], context_length=CTX, capture="blocks.1.hook_mlp_out")
    assert actvpipe.stream(tmp_path, texts[:2], context_length=CTX, capture="mlp_out").spec.capture == (
        "mlp_out",
    )


def run_example(*args: str, crash: bool = False) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "60", "--n-checkpoints", "2", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        timeout=600,
    )
    assert out.returncode == (-9 if crash else 0), out.stderr[-3000:]
    return out.stdout


def test_saelens_trainer_resumes_after_a_crash_exactly_as_an_uninterrupted_run(tmp_path):
    """SAELens' ``SAETrainer`` (norm estimate from the stream, 60 steps) fed by ``data_provider``:
    the loss falls. A run SIGKILLed right after its first checkpoint and resumed from it trains on
    the batches the uninterrupted run trained on after that point, and ends with the same SAE."""
    whole, crashed, resumed = (tmp_path / n for n in ("whole", "crashed", "resumed"))
    out = run_example(
        "--checkpoints", str(tmp_path / "a"), "--record", str(whole), "--final", str(whole) + ".pt"
    )
    first, last = map(float, out.split("loss: first 5 steps ")[1].split(", last 5 steps "))
    assert last < first / 2
    run_example(
        "--checkpoints", str(tmp_path / "b"), "--record", str(crashed), "--crash-after", "1", crash=True
    )
    out = run_example(
        "--checkpoints",
        str(tmp_path / "b"),
        "--record",
        str(resumed),
        "--final",
        str(resumed) + ".pt",
        "--resume",
    )
    whole_batches, before, after = (p.read_text().split() for p in (whole, crashed, resumed))
    step = int(out.split("at step ")[1].split()[0])
    assert len(whole_batches) == 5 + 60 and len(before) == 5 + step and 0 < step < 60
    assert before + after == whole_batches
    ours, theirs = torch.load(str(resumed) + ".pt"), torch.load(str(whole) + ".pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_multi_sae_trainer_trains_each_hook_from_one_stream_and_resumes(model_dir, texts, tmp_path):
    """``MultiSAETrainer`` on two hooks of one stream: each SAE sees its hook's columns of the same
    batches; resumed from the checkpoint it wrote, a new trainer has the checkpoint's counts and
    its provider continues with the batch the first run trained on next."""
    hooks = {"mid": "blocks.1.hook_resid_mid", "out": "blocks.1.hook_mlp_out"}
    stream = actvpipe.stream(
        model_dir, texts[:6], context_length=CTX, capture=list(hooks.values()), deterministic=True
    )
    cfg = SAETrainerConfig(
        total_training_samples=128 * 12,
        train_batch_size_samples=128,
        lr=1e-3,
        lr_end=1e-3,
        device="cpu",
        n_checkpoints=1,
        checkpoint_path=str(tmp_path),
        logger=LoggingConfig(log_to_wandb=False),
    )

    def trainer_of(provider, data=None):
        saes = {
            name: StandardTrainingSAE(
                StandardTrainingSAEConfig(d_in=64, d_sae=128, l1_coefficient=1e-3, device="cpu")
            )
            for name in hooks
        }
        save = saelens.save_checkpoint_fn(provider)
        return MultiSAETrainer(cfg, saes, hooks, data or provider, save_checkpoint_fn=save)

    loader = stream.buffer(2000).batch(128, drop_last=True)
    provider = saelens.multi_hook_data_provider(loader, list(hooks.values()))
    seen = []

    def watched():
        for batch in provider:
            seen.append(batch)
            yield batch

    with loader:
        trainer_of(provider, watched()).fit()
    assert len(seen) == 12 and all(set(b) == set(hooks.values()) for b in seen)
    (checkpoint,) = tmp_path.iterdir()
    assert {"mid", "out", saelens.STATE_FILE} <= {p.name for p in checkpoint.iterdir()}
    position = int(checkpoint.name) // 128  # batches trained on when the checkpoint was saved
    with stream.buffer(2000).batch(128, drop_last=True) as plain:
        rows = next(iter(plain))
    assert torch.equal(seen[0]["blocks.1.hook_resid_mid"], rows[:, 0, 0])
    assert torch.equal(seen[0]["blocks.1.hook_mlp_out"], rows[:, 1, 0])

    loader = stream.buffer(2000).batch(128, drop_last=True)
    provider = saelens.multi_hook_data_provider(loader, list(hooks.values()))
    resumed = trainer_of(provider)
    saelens.resume(resumed, provider, checkpoint)
    assert (resumed.n_training_samples, resumed.n_training_steps) == (position * 128, position)
    assert resumed.checkpoint_thresholds == []
    with loader:
        again = next(provider)
    assert again.keys() == seen[position].keys()
    assert all(torch.equal(again[k], seen[position][k]) for k in again)
