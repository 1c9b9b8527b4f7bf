"""Monitoring: TensorBoard scalars read back, the dashboard line, and the CLI that shows them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import actvpipe
from actvpipe.monitor import TAGS, dashboard_line
from actvpipe.shm import buffer_nbytes

CTX = 32


def scalars(log_dir) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_dashboard_line_format():
    line = dashboard_line(45_231, 1_000_000, 1234.4, False, 2_000_000)
    assert line == "Buffer: 45,231/1,000,000 (4.5%) | Rate: 1,234/s | Device: cpu | Served: 2,000,000"
    assert "Device: gpu" in dashboard_line(1, 2, 0.0, True, 0)


def test_metrics_and_dashboard_of_a_mixed_run(tmp_path, model_dir, texts, capsys):
    """Every tag with plausible values, the dashboard on stderr, and prints kept whole on stdout."""
    disk = actvpipe.stream(model_dir, texts[6:10], context_length=CTX).to_hdf5(
        tmp_path / "disk.h5", progress=False
    )
    size = 600
    stream = actvpipe.stream(model_dir, texts[:6], context_length=CTX, device="auto")
    buffered = stream.buffer(size, hdf5=disk, log_dir=tmp_path / "tb", progress=True, refresh_interval=0.01)
    with buffered.batch(50) as loader:
        for step, _ in enumerate(loader):
            print(f"step {step} done")
        assert type(sys.stdout).__name__ != "DummyTqdmFile", "stdout is given back when iteration ends"
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line] == [f"step {i} done" for i in range(step + 1)]
    device = "gpu" if torch.cuda.is_available() else "cpu"  # auto starts on the GPU when there is one
    assert "Buffer: " in err and "/600 (" in err and f"| Device: {device} | Served: " in err

    values = scalars(tmp_path / "tb")
    assert set(TAGS) <= set(values), f"missing {set(TAGS) - set(values)}"
    assert all(0.0 <= v <= 1.0 for v in values["buffer/fill_fraction"])
    assert max(values["buffer/fill_fraction"]) > 0.5
    for tag in ("rate/generated_per_s", "rate/served_per_s", "rate/disk_per_s"):
        assert min(values[tag]) >= 0 and max(values[tag]) > 0, tag
    assert set(values["generator/device_is_gpu"]) <= {0.0, 1.0}
    if not torch.cuda.is_available():
        assert set(values["generator/device_is_gpu"]) == {0.0}, "no CUDA: auto runs on the CPU"
    assert min(values["memory/rss_bytes"]) > buffer_nbytes(size, (2, 4, 64), stream.spec.dtype)
    assert max(values["memory/rss_bytes"]) < 8 << 30
    assert all(0 <= v < 60 for v in values["loader/wait_s"]) and max(values["loader/wait_s"]) > 0


def test_no_dashboard_when_stderr_is_not_a_terminal(model_dir, texts, capsys):
    with actvpipe.stream(model_dir, texts[:2], context_length=CTX).buffer(200).batch(50) as loader:
        next(iter(loader))
    assert "Buffer:" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["cache"], ["inspect"], ["bench"]])
def test_help_everywhere(command):
    out = subprocess.run(
        [sys.executable, "-m", "actvpipe", *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "usage: actvpipe" in out.stdout


def test_demo_command_runs_offline_with_dashboard_and_metrics(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACTVPIPE_CACHE": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "actvpipe", "demo", "--steps", "5", "--log-dir", str(tmp_path / "tb")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert "batch 5: [512, 2, 4, 64]" in out.stdout
    assert "Buffer: " in out.stderr and "/16,384 (" in out.stderr and "Device: cpu" in out.stderr
    assert set(TAGS) <= set(scalars(tmp_path / "tb"))
