"""Train a model-diffing crosscoder on two models' residual streams, streamed side by side by actvpipe.

Each row holds both models' activations at the same token (``actvpipe.stream([base, tuned], ...)``),
so one shuffle serves aligned pairs. The crosscoder encodes both models' vectors into one dictionary
and decodes each model's vector from it; latents whose decoder norm is large for one model only are
the ones the fine-tune changed. Offline, the "fine-tuned" model is the bundled tiny model with
perturbed weights (built on first use); pass --models BASE TUNED to diff real ones.

Every --every steps the crosscoder, its optimizer and the loader's state go into one torch.save
file; with --resume the run continues from it, serving exactly the rows not served yet.

    python examples/train_crosscoder.py --steps 200 --checkpoint xc.pt           # may be interrupted
    python examples/train_crosscoder.py --steps 400 --checkpoint xc.pt --resume  # continues
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import actvpipe
from actvpipe.demo import cache_dir, corpus_path, demo_model_dir


class Crosscoder(nn.Module):
    """One dictionary over ``n_models`` vectors: codes = ReLU(sum_m x_m W_enc[m] + b), and each
    model's vector is decoded as x_m ≈ codes W_dec[:, m]."""

    def __init__(self, n_models: int, d_model: int, d_dict: int):
        super().__init__()
        self.encoder = nn.Parameter(torch.randn(n_models, d_model, d_dict) / d_model**0.5)
        self.decoder = nn.Parameter(torch.randn(d_dict, n_models, d_model) / d_dict**0.5)
        self.bias = nn.Parameter(torch.zeros(d_dict))
        self.decoder_bias = nn.Parameter(torch.zeros(n_models, d_model))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.relu(torch.einsum("bmd,mdk->bk", x, self.encoder) + self.bias)
        return torch.einsum("bk,kmd->bmd", codes, self.decoder) + self.decoder_bias, codes


def tuned_demo_model() -> Path:
    """The bundled tiny model with seeded weight noise: a stand-in for a fine-tune, built once."""
    base = demo_model_dir()
    out = cache_dir() / f"{base.name}-tuned"
    if not (out / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        tmp = tempfile.mkdtemp(dir=out.parent, prefix=".building-")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--checkpoint", default="crosscoder_checkpoint.pt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--models", nargs=2, metavar=("BASE", "TUNED"), default=None)
    parser.add_argument("--dataset", default=None, help="default: the bundled corpus")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--l1", type=float, default=1e-3)
    args = parser.parse_args()

    models = args.models or [str(demo_model_dir()), str(tuned_demo_model())]
    stream = actvpipe.stream(
        models,
        args.dataset or str(corpus_path()),
        context_length=128,
        layers=[args.layer],
        capture=("resid_post",),
    )
    loader = stream.buffer(32_768).batch(1024)  # batches [1024, 2 models, 1 point, 1 layer, d_model]
    n_models, _, _, d_model = loader.spec.row_shape
    torch.manual_seed(0)
    crosscoder = Crosscoder(n_models, d_model, 4 * d_model)
    optimizer = torch.optim.Adam(crosscoder.parameters(), lr=1e-3)
    step = 0
    if args.resume and os.path.exists(args.checkpoint):
        saved = torch.load(args.checkpoint, weights_only=False)
        crosscoder.load_state_dict(saved["crosscoder"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
        print(f"resumed at step {step}")

    with loader:
        while step < args.steps:
            for batch in loader:  # a finite pass; the outer loop starts the next one
                x = batch[:, :, 0, 0]  # [batch, n_models, d_model]
                recon, codes = crosscoder(x)
                norms = crosscoder.decoder.norm(dim=-1).sum(
                    -1
                )  # each latent's decoder norm, summed over models
                loss = (recon - x).pow(2).sum((-1, -2)).mean() + args.l1 * (codes * norms).sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step % args.every == 0 or step == args.steps:
                    state = {"crosscoder": crosscoder.state_dict(), "optimizer": optimizer.state_dict()}
                    torch.save({**state, "step": step, "loader": loader.state_dict()}, args.checkpoint)
                    with torch.no_grad():
                        per_model = crosscoder.decoder.norm(dim=-1)  # [d_dict, n_models]
                        share = (per_model[:, 1] / per_model.sum(-1)).median()
                    l0 = (codes > 0).float().sum(-1).mean()
                    print(
                        f"step {step}: loss {loss.item():.5f}, L0 {l0:.1f}, median tuned share of decoder "
                        f"norm {share:.3f}, checkpoint saved",
                        flush=True,
                    )
                if step == args.steps:
                    break


if __name__ == "__main__":
    main()
