"""Architectures and capture points: tiny models built from each config; served rows equal an
independent forward-hook computation; each capture point checked against its definition."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import reference_contexts
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import actvpipe
from actvpipe.capture import ActivationCapture, MultiModelCapture

CTX = 32
SMALL = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "num_hidden_layers": 2}
CONFIGS = {
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_head": 4, "n_layer": 2}),
    "gpt_neox": ("GPTNeoXConfig", {**SMALL, "use_parallel_residual": True}),
    "llama": ("LlamaConfig", {**SMALL, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", {**SMALL, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {**SMALL, "num_key_value_heads": 2}),
    "gemma": ("GemmaConfig", {**SMALL, "head_dim": 16, "num_key_value_heads": 2}),
    "gemma2": ("Gemma2Config", {**SMALL, "head_dim": 16, "num_key_value_heads": 2}),
    "gemma3_text": ("Gemma3TextConfig", {**SMALL, "head_dim": 16, "num_key_value_heads": 2}),
    "phi3": ("Phi3Config", {**SMALL, "num_key_value_heads": 2}),  # not in the table: needs modules=
}
# This test's own view of each architecture, from the full model: (decoder layers, norm feeding the
# MLP, the module whose output the block adds to the residual stream as the attention's contribution).
LAYOUT = {
    "gpt2": ("transformer.h", "ln_2", "attn"),
    "gpt_neox": ("gpt_neox.layers", "post_attention_layernorm", "attention"),
    "gemma2": ("model.layers", "pre_feedforward_layernorm", "post_attention_layernorm"),
    "gemma3_text": ("model.layers", "pre_feedforward_layernorm", "post_attention_layernorm"),
}
PHI3_MODULES = ("model.layers.{i}.post_attention_layernorm", "model.layers.{i}.mlp")
POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
# Each architecture's served rows: attn_out always, k from 1 to 6 points, in the user's order.
SERVED_CAPTURE = {
    "gpt2": ("resid_pre", "attn_out", "mlp_out"),
    "gpt_neox": ("attn_out", "mlp_out", "resid_post"),
    "llama": ("attn_out",),
    "mistral": ("mlp_out", "attn_out"),
    "qwen2": ("resid_mid", "attn_out", "mlp_in", "resid_post"),
    "gemma": ("attn_out", "resid_pre"),
    "gemma2": ("mlp_in", "attn_out", "resid_post"),
    "gemma3_text": ("resid_post", "mlp_out", "mlp_in", "resid_mid", "attn_out", "resid_pre"),
}


def layout(arch: str) -> tuple[str, str, str]:
    return LAYOUT.get(arch, ("model.layers", "post_attention_layernorm", "self_attn"))


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for arch, (config_class, kwargs) in CONFIGS.items():
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            **({"n_positions": 256} if arch == "gpt2" else {"max_position_embeddings": 256}),
            **kwargs,
        )
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(arch)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[arch] = path
    return out


def reference(path, arch: str, contexts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every capture point ``[n_ctx, ctx, n_layers, d]`` by plain hooks on the full causal-LM model."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    layers_path, norm_name, attn_name = layout(arch)
    saved: dict[tuple[str, int], torch.Tensor] = {}

    def pre(name, i):
        return lambda m, a, k: saved.__setitem__((name, i), (a[0] if a else k["hidden_states"]).clone())

    def post(name, i):
        return lambda m, a, o: saved.__setitem__((name, i), (o[0] if isinstance(o, tuple) else o).clone())

    for i, block in enumerate(model.get_submodule(layers_path)):
        block.register_forward_pre_hook(pre("resid_pre", i), with_kwargs=True)
        getattr(block, norm_name).register_forward_pre_hook(pre("resid_mid", i), with_kwargs=True)
        block.mlp.register_forward_pre_hook(pre("mlp_in", i), with_kwargs=True)
        block.mlp.register_forward_hook(post("mlp_out", i))
        block.register_forward_hook(post("resid_post", i))
        getattr(block, attn_name).register_forward_hook(post("attn_out", i))
    points = {}
    with torch.no_grad():
        for name in POINTS:
            points[name] = []
        for ctx in contexts:
            model(ctx[None])
            for name in points:
                points[name].append(torch.stack([saved[(name, i)][0] for i in range(2)], 1))
    return {name: torch.stack(values) for name, values in points.items()}


@pytest.fixture(scope="module")
def contexts(arch_dirs, texts):
    """Each model's contexts, packed with its own saved tokenizer (AutoTokenizer may pick a class per
    architecture, which can split text differently)."""
    return {arch: reference_contexts(path, texts[:2], CTX) for arch, path in arch_dirs.items()}


@pytest.mark.parametrize("arch", [a for a in CONFIGS if a != "phi3"])
def test_served_rows_equal_forward_hooks(arch, arch_dirs, texts, contexts):
    capture = SERVED_CAPTURE[arch]
    stream = actvpipe.stream(arch_dirs[arch], texts[:2], context_length=CTX, capture=capture)
    assert stream.row_shape == (len(capture), 2, 64)
    with stream.buffer(5000).batch(5000, with_tokens=True) as loader:
        batch = next(iter(loader))
    ref = reference(arch_dirs[arch], arch, contexts[arch])
    expected = torch.stack([ref[point] for point in capture], 2)[:, 1:].reshape(-1, len(capture), 2, 64)
    assert len(batch) == len(expected)
    got = batch.acts[torch.argsort(batch.seq * CTX + batch.pos)]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "gemma2", "gemma3_text"])
def test_capture_points_match_their_definitions(arch, arch_dirs, contexts):
    """In-process: each point as captured, related to the others as its definition says."""
    contexts = contexts[arch]
    model = AutoModel.from_pretrained(arch_dirs[arch]).eval()
    got = {}
    for pair in (("resid_pre", "resid_mid"), ("mlp_in", "mlp_out"), ("resid_post", "attn_out")):
        capture = ActivationCapture(model, [0, 1], 0, pair)
        rows = capture(contexts).clone().view(len(contexts), CTX, 2, 2, 64)
        capture.remove()
        got.update({pair[0]: rows[:, :, 0], pair[1]: rows[:, :, 1]})
    ref = reference(arch_dirs[arch], arch, contexts)
    for name, value in got.items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-5, msg=name)
    # Definitions: the block output is the next block's input; the MLP reads the normalised resid_mid.
    torch.testing.assert_close(got["resid_post"][:, :, 0], got["resid_pre"][:, :, 1])
    _, norm_name, _ = layout(arch)
    layers = model.h if arch == "gpt2" else model.layers
    with torch.no_grad():
        for i in range(2):
            normed = getattr(layers[i], norm_name)(got["resid_mid"][:, :, i])
            torch.testing.assert_close(got["mlp_in"][:, :, i], normed, rtol=1e-4, atol=1e-5)
    # mlp_in_normalized is that norm with an identity weight and no bias (Gemma scales by 1 + weight),
    # checked on a copy of the model whose norms have non-trivial weights (tiny models start at identity).
    torch.manual_seed(1)
    perturbed = copy.deepcopy(model)
    blocks = perturbed.h if arch == "gpt2" else perturbed.layers
    with torch.no_grad():
        for block in blocks:
            for param in getattr(block, norm_name).parameters():
                param.add_(0.3 * torch.randn_like(param))
    capture = ActivationCapture(perturbed, [0, 1], 0, ("mlp_in_normalized", "resid_mid", "mlp_in"))
    rows = capture(contexts).clone().view(len(contexts), CTX, 3, 2, 64)
    capture.remove()
    with torch.no_grad():
        for i in range(2):
            plain = copy.deepcopy(getattr(blocks[i], norm_name))
            plain.weight.fill_(0.0 if arch.startswith("gemma") else 1.0)
            if getattr(plain, "bias", None) is not None:
                plain.bias.zero_()
            expected = plain(rows[:, :, 1, i])
            torch.testing.assert_close(rows[:, :, 0, i], expected, rtol=1e-4, atol=1e-5)
            assert not torch.allclose(expected, rows[:, :, 2, i], atol=1e-2), "the norm's weights matter"
    if arch == "gpt_neox":  # parallel residual: the MLP's norm reads the block input, both add up
        torch.testing.assert_close(got["resid_mid"], got["resid_pre"])
        summed = got["resid_pre"] + got["attn_out"] + got["mlp_out"]
        torch.testing.assert_close(got["resid_post"], summed, rtol=1e-4, atol=1e-5)
    else:  # sequential: the attention sublayer's output is what it adds to the residual stream
        delta = got["resid_mid"] - got["resid_pre"]
        torch.testing.assert_close(got["attn_out"], delta, rtol=1e-4, atol=1e-5)
    if arch in ("gpt2", "llama"):  # sequential: the block output is resid_mid plus the MLP's output
        torch.testing.assert_close(got["resid_post"], got["resid_mid"] + got["mlp_out"], rtol=1e-4, atol=1e-5)
    elif arch != "gpt_neox":  # gemma2 and gemma3 normalise the MLP output before adding it
        with torch.no_grad():
            post = torch.stack(
                [layers[i].post_feedforward_layernorm(got["mlp_out"][:, :, i]) for i in range(2)], 2
            )
        torch.testing.assert_close(got["resid_post"], got["resid_mid"] + post, rtol=1e-4, atol=1e-5)


def test_unknown_architecture_shows_the_override(arch_dirs, texts, contexts):
    contexts = contexts["phi3"]
    with pytest.raises(ValueError, match=r"'phi3'.*modules=\("):
        actvpipe.stream(arch_dirs["phi3"], texts[:2], context_length=CTX)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.nope.*is not a module"):
        actvpipe.stream(
            arch_dirs["phi3"],
            texts[:2],
            context_length=CTX,
            modules=("model.layers.{i}.nope", "model.layers.{i}.mlp"),
        )
    for bad in (("mlp_out", "mlp_out"), (), ("attn",)):
        with pytest.raises(ValueError, match=r"capture: expected one or more distinct points"):
            actvpipe.stream(arch_dirs["llama"], texts[:2], context_length=CTX, capture=bad)
    with pytest.raises(ValueError, match=r"attn_out needs a third template"):
        actvpipe.stream(
            arch_dirs["phi3"], texts[:2], context_length=CTX, modules=PHI3_MODULES, capture=("attn_out",)
        )
    stream = actvpipe.stream(arch_dirs["phi3"], texts[:2], context_length=CTX, modules=PHI3_MODULES)
    assert stream.spec.modules == PHI3_MODULES
    model = AutoModel.from_pretrained(arch_dirs["phi3"]).eval()
    rows = ActivationCapture(model, [0, 1], 0, modules=PHI3_MODULES)(contexts).view(
        len(contexts), CTX, 2, 2, 64
    )
    ref = reference(arch_dirs["phi3"], "phi3", contexts)
    torch.testing.assert_close(rows[:, :, 0], ref["resid_mid"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[:, :, 1], ref["mlp_out"], rtol=1e-4, atol=1e-5)


def test_phi3_attn_out_through_a_third_template(arch_dirs, contexts):
    model = AutoModel.from_pretrained(arch_dirs["phi3"]).eval()
    modules = (*PHI3_MODULES, "model.layers.{i}.self_attn")
    rows = ActivationCapture(model, [0, 1], 0, ("attn_out",), modules)(contexts["phi3"])
    ref = reference(arch_dirs["phi3"], "phi3", contexts["phi3"])
    torch.testing.assert_close(rows.view(-1, CTX, 1, 2, 64)[:, :, 0], ref["attn_out"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("capture", "layers", "runs", "skipped"),
    [
        (("attn_out",), [0, 1], ["h.0.mlp", "h.1.attn"], ["h.1.ln_2", "h.1.mlp", "ln_f"]),
        (("mlp_out", "resid_pre"), [0], ["h.0.mlp"], ["h.1.attn", "h.1.mlp", "ln_f"]),
        (("resid_mid",), [0, 1], ["h.1.attn"], ["h.1.mlp", "ln_f"]),
        (("resid_post",), [0, 1], ["h.1.mlp"], ["ln_f"]),
    ],
)
def test_forward_stops_after_the_last_module_needed(arch_dirs, contexts, capture, layers, runs, skipped):
    """Every module after the last captured point is skipped: later sublayers, blocks, the final norm."""
    model = AutoModel.from_pretrained(arch_dirs["gpt2"]).eval()
    called = set()
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, a, o, name=name: called.add(name))
    capture = ActivationCapture(model, layers, 0, capture)
    capture(contexts["gpt2"])
    assert set(runs) <= called
    assert not set(skipped) & called


def test_rows_still_held_are_never_overwritten_by_the_next_forward(arch_dirs, contexts):
    """Staging tensors come from a pool: a forward writes only a tensor nothing references, so a block
    still being written out (to the buffer, to a write-through file) keeps its rows."""
    tokens = contexts["gpt2"]
    models = [AutoModel.from_pretrained(arch_dirs["gpt2"]).eval() for _ in range(2)]
    single = ActivationCapture(models[0], [0, 1], 0)
    side_by_side = MultiModelCapture([ActivationCapture(m, [0, 1], 0) for m in models])
    for capture in (single, side_by_side):
        held = capture(tokens)
        expected = held.clone()
        other = capture(tokens.flip(1))
        assert not torch.equal(other, expected)
        assert torch.equal(held, expected), "the next forward wrote over rows still held"
        address = held.data_ptr()
        del held
        assert capture(tokens).data_ptr() == address, "once dropped, its tensor is reused"
