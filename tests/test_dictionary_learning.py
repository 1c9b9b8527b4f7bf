"""dictionary_learning's own ``trainSAE`` trains from ``activations``: on one hook ``[B, d]`` (its
norm factor estimated from our stream) and on an in/out pair ``[B, 2, d]``. It runs in a child
process (``dictionary_learning_run.py`` says why)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actvpipe

STEPS = 60
HOOKS = ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")


@pytest.mark.parametrize("pair", [False, True], ids=["one hook", "in-out pair"])
def test_train_sae_trains_from_the_stream(model_dir, texts, pair):
    script = Path(__file__).with_name("dictionary_learning_run.py")
    out = subprocess.run(
        [sys.executable, str(script), str(model_dir), "pair" if pair else "one", str(STEPS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    losses = result["losses"]
    assert len(losses) == STEPS and sum(losses[-5:]) < sum(losses[:5]) / 2
    assert (
        result["config"]["io"] == ("in_and_out" if pair else "out") and result["config"]["d_submodule"] == 64
    )
    # The first batch trainSAE drew is the stream's first batch, as [B, 2, d] pairs or [B, d].
    stream = actvpipe.stream(
        model_dir, texts[:30], context_length=64, capture=list(HOOKS), deterministic=True
    )
    with stream.buffer(4096).batch(256) as plain:
        rows = next(iter(plain))
    expected = torch.stack([rows[:, 0, 0], rows[:, 1, 0]], 1) if pair else rows[:, 1, 0].contiguous()
    assert result["first"] == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
