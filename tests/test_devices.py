"""Device policy (pure), its application to a model, and model dtype apart from buffer dtype."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_exact_batches, reference_pass, resumed_run
from torch import nn

import actvpipe
from actvpipe.device_copy import DeviceCopy
from actvpipe.placement import Placement, check_watermarks, next_on_gpu, replay

CTX = 32


def test_policy_switches_with_hysteresis():
    fills = [0.0, 0.5, 0.8, 0.6, 0.3, 0.2, 0.5, 0.76, 0.74]
    assert replay(fills, 0.25, 0.75) == [True, True, False, False, False, True, True, False, False]
    assert replay([0.5], 0.25, 0.75, on_gpu=False) == [False], "between the watermarks: stay"
    assert next_on_gpu(0.25, False, 0.25, 0.75) is False and next_on_gpu(0.75, True, 0.25, 0.75) is True


@pytest.mark.parametrize("bad", [(0.8, 0.2), (0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), "low", (0.1,)])
def test_bad_watermarks_are_clear_errors(bad, model_dir, texts):
    with pytest.raises(ValueError, match="watermarks"):
        check_watermarks(bad)
    with pytest.raises(ValueError, match="watermarks"):
        actvpipe.stream(model_dir, texts[:2], context_length=CTX, watermarks=bad)


def test_placement_follows_the_fill_and_logs_each_switch(caplog):
    fills = iter([0.1, 0.9, 0.9, 0.5, 0.1])
    reported = []
    model = nn.Linear(2, 2)
    # "cpu" stands in for the GPU so the switching logic runs on this machine; gpu.sh runs CUDA.
    placement = Placement(model, "auto", (0.25, 0.75), lambda: next(fills), reported.append, gpu="cpu")
    with caplog.at_level(logging.INFO, logger="actvpipe"):
        devices = [placement.update() for _ in range(5)]
    assert reported == [True, True, False, False, False, True]
    assert all(d.type == "cpu" for d in devices)
    assert [r.getMessage() for r in caplog.records] == [
        "actvpipe: generator moved to the CPU, cpu (buffer 90% full)",
        "actvpipe: generator moved to the GPU, cpu (buffer 10% full)",
    ]


def test_fixed_device_never_moves(model_dir):
    placement = Placement(nn.Linear(2, 2), "cpu", fill=lambda: 0.0)
    assert placement.update() == torch.device("cpu") and not placement.on_gpu


def test_auto_is_adaptive_with_cuda_and_the_cpu_without(model_dir, texts):
    device = actvpipe.stream(model_dir, texts[:2], context_length=CTX, device="auto").options.device
    assert device == ("auto" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "model_dtype, dtype, tolerance",
    [
        (torch.bfloat16, torch.float32, 0.1),  # bf16 forward into an fp32 buffer
        (torch.float32, torch.bfloat16, 2e-2),  # fp32 forward, half the buffer memory
        (torch.float16, torch.float16, 1e-2),
    ],
)
def test_model_dtype_apart_from_buffer_dtype(model_dir, texts, model_dtype, dtype, tolerance):
    """Rows in the buffer's dtype, each within its dtype's tolerance of the float32 reference."""
    docs = texts[:3]
    _, rows = reference_pass(model_dir, docs, CTX)
    expected = rows[:, 1:].reshape(-1, *rows.shape[2:])
    stream = actvpipe.stream(model_dir, docs, context_length=CTX, model_dtype=model_dtype, dtype=dtype)
    with stream.buffer(10_000).batch(10_000, with_tokens=True) as loader:
        batch = next(iter(loader))
    assert batch.acts.dtype == dtype and len(batch) == len(expected)
    got = batch.acts[torch.argsort(batch.seq * CTX + batch.pos)].float()
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert not torch.equal(got, expected), "rows really went through the lower precision"
    with pytest.raises(TypeError, match="model_dtype"):
        actvpipe.stream(model_dir, docs, model_dtype=torch.int8)


def test_gpu_sh_runs_from_its_wheel_folder_alone_in_cpu_smoke_mode(tmp_path):
    """benchmarks/gpu.sh as the GPU machine runs it: no package index, the project never installed,
    packages only from the "image" (this environment without what the wheel folder provides, and
    without actvpipe) and from the wheels benchmarks/gpu_wheels.sh downloads (for this python here).
    Each check prints as it finishes and the log file holds what was printed. The comparisons are
    CPU rows against CPU rows here: this checks the script, not CUDA."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    wheels = tmp_path / "wheels"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run(
        ["bash", "benchmarks/gpu_wheels.sh"],
        cwd=root,
        env={**env, "GPU_PYTHON": python, "GPU_WHEELS": str(wheels)},
        check=True,
        capture_output=True,
        timeout=300,
    )
    provided = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
    venv = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    image = image_without(tmp_path / "image-packages", provided | {"actvpipe"})
    purelib = next((venv / "lib").glob("python*/site-packages"))
    (purelib / "image.pth").write_text(f"import site; site.addsitedir({str(image)!r})\n")
    log = tmp_path / "out" / "gpu.log"
    settings = {"PYTHON": str(venv / "bin" / "python"), "GPU_WHEELS": str(wheels), "GPU_LOG": str(log)}
    out = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--smoke"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**env, **settings, "GPU_SITE": str(tmp_path / "site")},
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    installed = re.search(r"installing from .* into .*: (.*)", out.stdout)
    assert installed and {r.split("==")[0].lower() for r in installed.group(1).split()} == provided
    assert out.stdout.count("OK  ") == 6 and "FAIL" not in out.stdout
    assert len(re.findall(r"^time .* ms a (block|batch)", out.stdout, re.M)) == 3
    assert re.search(r"captured tokens/s / bare bf16 forward tokens/s +[\d,]+ +[\d,]+ +\d\.\d{3}", out.stdout)
    assert log.read_text() == out.stdout


def image_without(directory: Path, distributions: set[str]) -> Path:
    """A directory of links to this environment's installed packages, except ``distributions``'
    (their modules and metadata) and any editable install."""
    from importlib import metadata

    dropped = set()
    for dist in metadata.distributions():
        name = dist.metadata["Name"].lower().replace("-", "_")
        if name in {d.replace("-", "_") for d in distributions}:
            dropped |= {Path(str(f)).parts[0] for f in dist.files or []}
    site = Path(metadata.distribution("torch").locate_file(""))
    directory.mkdir()
    for entry in site.iterdir():
        if entry.name in dropped or "editable" in entry.name or entry.name.startswith("actvpipe"):
            continue
        (directory / entry.name).symlink_to(entry)
    return directory


def test_batches_handed_over_on_a_device_are_exact_across_a_resume(model_dir, texts, monkeypatch):
    """``.batch(device=...)`` gathers, copies on a side stream and makes the consumer's stream wait
    on it; torch's CPU streams run those same steps here (gpu.sh runs them on CUDA). Every field of
    every batch, before and after the checkpoint, goes through the hand-over (its side stream and
    the consumer stream's wait are counted), and the pass served is exact, provenance included.
    (Before, the test could not tell whether the hand-over ran at all.)"""
    copied, waits = [], []
    real_copy, real_wait = DeviceCopy.to_device, torch.cpu.Stream.wait_stream
    monkeypatch.setattr(DeviceCopy, "to_device", lambda self, t: copied.append(t.shape) or real_copy(self, t))
    monkeypatch.setattr(
        torch.cpu.Stream, "wait_stream", lambda self, s: waits.append(s) or real_wait(self, s)
    )

    def loader():
        stream = actvpipe.stream(model_dir, texts[:10], context_length=CTX, generation_batch_size=4)
        return stream.buffer(2000).batch(100, with_tokens=True, device="cpu")

    batches, _ = resumed_run(loader, 3)
    assert len(copied) == len(waits) == 5 * len(batches), "acts, token_ids, seq, pos, source"
    assert all(b.acts.device.type == "cpu" == b.seq.device.type for b in batches)
    assert_exact_batches(batches, reference_pass(model_dir, texts[:10], CTX), CTX)


def test_batch_device_is_checked_before_any_work(model_dir, texts):
    buffered = actvpipe.stream(model_dir, texts[:2], context_length=CTX).buffer(1000)
    bad = {"meta": "not supported", "nonsense": "not a device", "cuda:99": "CUDA"}
    if not torch.cuda.is_available():
        bad["cuda"] = "CUDA is not available here; pass device='cpu'"
    for device, words in bad.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            buffered.batch(10, device=device)
