"""The examples run as users run them: the SAE and crosscoder training loops checkpoint and resume."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actvpipe.loader_state import LoaderState

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize(
    ("script", "trained"), [("train_sae.py", "sae"), ("train_crosscoder.py", "crosscoder")]
)
def test_training_example_checkpoints_and_resumes(script, trained, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ckpt = str(tmp_path / "model.pt")
    first = run(script, "--steps", "6", "--every", "3", "--checkpoint", ckpt, env=env)
    assert re.findall(r"step (\d+): loss", first) == ["3", "6"]
    saved = torch.load(ckpt, weights_only=False)
    assert saved["step"] == 6 and {trained, "optimizer", "loader"} <= set(saved)
    assert LoaderState.from_dict(saved["loader"]).buffer.batches == 6
    second = run(script, "--steps", "9", "--every", "3", "--checkpoint", ckpt, "--resume", env=env)
    assert "resumed at step 6" in second
    assert re.findall(r"step (\d+): loss", second) == ["9"]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", first + second)]
    assert all(0 < x < 1e3 for x in losses)
    assert LoaderState.from_dict(torch.load(ckpt, weights_only=False)["loader"]).buffer.batches == 9


def test_sparsify_example_trains_and_resumes_to_the_uninterrupted_coder(tmp_path):
    """sparsify's ``SparseCoder`` trained by the example: the FVU falls, and a run stopped at a
    checkpoint and resumed ends with the coder (weights and all) of a run that never stopped."""
    from safetensors.torch import load_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole, split = tmp_path / "whole", tmp_path / "split"
    out = run("train_sparsify.py", "--steps", "40", "--every", "5", "--checkpoint", str(whole), env=env)
    fvu = [float(x) for x in re.findall(r"fvu ([0-9.]+)", out)]
    assert len(fvu) == 8 and fvu[-1] < fvu[0]
    run("train_sparsify.py", "--steps", "20", "--every", "10", "--checkpoint", str(split), env=env)
    second = run(
        "train_sparsify.py", "--steps", "40", "--every", "10", "--checkpoint", str(split), "--resume", env=env
    )
    assert "resumed at step 20" in second
    ours, theirs = load_file(split / "sae.safetensors"), load_file(whole / "sae.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
