"""Train sparsify's TopK ``SparseCoder`` on activations streamed by actvpipe, with checkpoint and resume.

sparsify hooks the model inside its own training loop, so it has no data seam; this is the loop its
``Trainer`` runs (FVU loss, unit-norm decoder, the decoder bias started at the first batch's mean),
fed by a loader. Every --every steps the coder (``save_to_disk``), the optimizer, the step and the
loader's state are saved; --resume continues with the batch after the checkpoint.

    python examples/train_sparsify.py --steps 200 --checkpoint sparsify_ckpt             # may stop
    python examples/train_sparsify.py --steps 400 --checkpoint sparsify_ckpt --resume    # continues
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the eager decoder: no GPU kernels on the host

import torch
from sparsify import SparseCoder, SparseCoderConfig

import actvpipe


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--checkpoint", default="sparsify_ckpt")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hook", default="blocks.2.hook_mlp_out")
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()

    loader = actvpipe.demo_stream(capture=[args.hook], deterministic=True).buffer(16_384).batch(512)
    checkpoint = Path(args.checkpoint)
    torch.manual_seed(0)
    if args.resume and checkpoint.exists():
        coder = SparseCoder.load_from_disk(checkpoint, device="cpu")
    else:
        coder = SparseCoder(
            loader.spec.d_model, SparseCoderConfig(expansion_factor=8, k=args.k), device="cpu"
        )
    optimizer = torch.optim.Adam(coder.parameters(), lr=2e-3)
    step = 0
    if args.resume and checkpoint.exists():
        saved = torch.load(checkpoint / "training.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])
        step = saved["step"]
        print(f"resumed at step {step}")

    with loader:
        while step < args.steps:
            for batch in loader:  # a finite pass; the outer loop starts the next one
                x = batch[:, 0, 0]  # the hook's [batch, d_model]
                if step == 0:
                    coder.b_dec.data = x.mean(0)
                coder.set_decoder_norm_to_unit_norm()
                out = coder(x)
                out.fvu.backward()
                coder.remove_gradient_parallel_to_decoder_directions()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if step % args.every == 0 or step == args.steps:
                    coder.save_to_disk(checkpoint)
                    state = {"optimizer": optimizer.state_dict(), "step": step, "loader": loader.state_dict()}
                    torch.save(state, checkpoint / "training.pt")
                    print(f"step {step}: fvu {out.fvu.item():.5f}, checkpoint saved", flush=True)
                if step == args.steps:
                    break


if __name__ == "__main__":
    main()
