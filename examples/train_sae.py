"""Train a sparse autoencoder on MLP outputs streamed by actvpipe, checkpointing everything needed to resume.

Every --every steps the SAE, its optimizer and the loader's state go into one torch.save file; with
--resume the run continues from that file: the loader serves exactly the rows the interrupted run
had not served yet, so no activation is seen twice or skipped.

    python examples/train_sae.py --steps 200 --checkpoint sae.pt           # may be interrupted
    python examples/train_sae.py --steps 400 --checkpoint sae.pt --resume  # continues
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import actvpipe


class SparseAutoencoder(nn.Module):
    """ReLU SAE with a pre-encoder bias and unit-norm decoder rows."""

    def __init__(self, d_model: int, d_dict: int):
        super().__init__()
        self.encoder = nn.Linear(d_model, d_dict)
        self.decoder = nn.Linear(d_dict, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = torch.relu(self.encoder(x - self.decoder.bias))
        return self.decoder(codes), codes


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--checkpoint", default="sae_checkpoint.pt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--l1", type=float, default=1e-3)
    args = parser.parse_args()

    loader = actvpipe.demo_stream(layers=[args.layer]).buffer(32_768).batch(1024)
    d_model = loader.spec.d_model
    torch.manual_seed(0)
    sae = SparseAutoencoder(d_model, 4 * d_model)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    step = 0
    if args.resume and os.path.exists(args.checkpoint):
        saved = torch.load(args.checkpoint, weights_only=False)
        sae.load_state_dict(saved["sae"])
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
        print(f"resumed at step {step}")

    with loader:
        while step < args.steps:
            for batch in loader:  # a finite pass; the outer loop starts the next one
                x = batch[:, 1, 0]  # mlp_out of the chosen layer: [batch, d_model]
                recon, codes = sae(x)
                loss = (recon - x).pow(2).sum(-1).mean() + args.l1 * codes.abs().sum(-1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    sae.decoder.weight /= sae.decoder.weight.norm(dim=0, keepdim=True)
                step += 1
                if step % args.every == 0 or step == args.steps:
                    state = {"sae": sae.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
                    torch.save({**state, "loader": loader.state_dict()}, args.checkpoint)
                    l0 = (codes > 0).float().sum(-1).mean()
                    print(f"step {step}: loss {loss.item():.5f}, L0 {l0:.1f}, checkpoint saved", flush=True)
                if step == args.steps:
                    break


if __name__ == "__main__":
    main()
