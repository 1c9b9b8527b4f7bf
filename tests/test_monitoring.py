"""Monitoring: TensorBoard scalars read back, the dashboard line, and the CLI that shows them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import actvpipe
from actvpipe.monitor import TAGS, Snapshot, dashboard_line
from actvpipe.shm import buffer_nbytes

CTX = 32


def scalars(log_dir) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def snapshot(t: float, held: int, generated: int, served: int, **kw) -> Snapshot:
    args = {"size": 1_000_000, "disk": 0, "on_gpu": False, "memory": 0, "waited": 0.0, "batches": 0}
    return Snapshot(time=t, held=held, generated=generated, served=served, **{**args, **kw})


def test_dashboard_line_says_both_rates_and_why_a_rate_is_zero():
    before = snapshot(0.0, 40_000, 10_000, 1_990_000)
    line = dashboard_line(before, snapshot(2.0, 45_231, 12_468.8, 2_000_000))
    assert (
        line == "Buffer: 45,231/1,000,000 (4.5%) | Rate: 1,234/s | Served: 5,000/s (2,000,000) | Device: cpu"
    )
    assert "Device: gpu" in dashboard_line(before, snapshot(2.0, 1, 10_000, 0, on_gpu=True))
    full = dashboard_line(before, snapshot(1.0, 1_000_000, 10_000, 1_990_000))
    assert "| Rate: paused (buffer full) | Served: 0/s" in full
    assert "| Rate: waiting for data |" in dashboard_line(before, snapshot(1.0, 40_000, 10_000, 1_990_000))
    assert "| Rate: done |" in dashboard_line(before, snapshot(1.0, 400, 10_000, 1_999_600, done=True))
    assert "| Rate: 300/s |" in dashboard_line(before, snapshot(1.0, 40_300, 10_000, 1_990_000, disk=300))


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
        assert type(sys.stdout).__name__ != "_Proxy", "stdout is given back when iteration ends"
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line] == [f"step {i} done" for i in range(step + 1)]
    device = "gpu" if torch.cuda.is_available() else "cpu"  # auto starts on the GPU when there is one
    assert "Buffer: " in err and "/600 (" in err and "| Served: " in err and f"| Device: {device}" in err

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


def test_a_log_file_gets_plain_dashboard_lines_and_no_control_codes(tmp_path):
    """stdout and stderr to one file, as under nohup or a CI log: the dashboard is a plain line now
    and then, every printed line stays whole. Before, the status line wrote carriage returns and
    escape codes into the file, and printed lines joined it (``...| Device: cpubatch 9: ...``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACTVPIPE_CACHE": str(tmp_path)}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "actvpipe", "demo", "--steps", "30"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=180,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("batch ")] == [
        line for line in lines if "batch " in line and "Buffer" not in line and "served" not in line
    ]
    assert len([line for line in lines if line.startswith("batch ")]) == 30
    dashboard = [line for line in lines if line.startswith("Buffer: ")]
    assert 1 <= len(dashboard) <= 3 and all(
        line.endswith(("Device: cpu", "Device: gpu")) for line in dashboard
    )


CHILD = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, format="log %(message)s")  # a handler on stderr, made first
import actvpipe
model_dir, ready, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
texts = [line for line in open(sys.argv[4]).read().split("\\x00") if line]
stream = actvpipe.stream(model_dir, texts, context_length=32)
with stream.buffer(2000, refresh_interval=0.0).batch(100) as loader:  # stderr is a terminal: dashboard on
    for i, batch in enumerate(loader):
        if i == 6:
            print("part-", end="", flush=True)  # a partial line: the dashboard must wait for its end
        elif i == 7:
            print("whole")
        elif i % 3 == 0:
            print(f"out {i}")
        elif i % 3 == 1:
            print(f"err {i}", file=sys.stderr)
        else:
            logging.info("info %d", i)
        if i == 12:
            os.write(ready, b"x")  # the parent reads the screen now
            os.read(go, 1)
        if i == 20:
            break
print("finished")
"""


def expected_lines(last: int) -> list[str]:
    lines = []
    for i in range(last + 1):
        if i == 6:
            continue
        lines.append("part-whole" if i == 7 else ("out", "err", "log info")[i % 3] + f" {i}")
    return lines


def test_dashboard_stays_one_line_at_the_bottom_of_a_real_terminal(model_dir, texts, tmp_path):
    """A training loop printing to stdout and stderr and logging, in a real pseudo-terminal of 120
    columns read back through a terminal emulator: the dashboard is always the last row and alone on
    it, every printed line is whole on its own row, and the dashboard is gone at the end."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    import pyte

    corpus = tmp_path / "texts"
    corpus.write_text("\x00".join(texts[:12]))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 200, 120, 0, 0))
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model_dir), str(ready_w), str(go_r), str(corpus)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        pass_fds=(ready_w, go_r),
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "xterm"},
    )
    os.close(slave)
    screen = pyte.Screen(120, 200)
    feed = pyte.ByteStream(screen)

    def pump(until_fd: int | None, seconds: float, settle: bool = False) -> None:
        """Feed the terminal's output to the screen until ``until_fd`` is readable (None: the child
        exited), or for ``seconds`` when ``settle``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            waited = [master] + ([until_fd] if until_fd is not None and until_fd >= 0 else [])
            readable, _, _ = select.select(waited, [], [], 0.1)
            if master in readable:
                try:
                    feed.feed(os.read(master, 65536))
                except OSError:  # the child closed the terminal
                    return
            elif until_fd in readable or (until_fd is None and child.poll() is not None and not readable):
                return
        assert settle, "timed out waiting for the child"

    try:
        pump(ready_r, 120)
        pump(-1, 0.3, settle=True)  # whatever is still in flight
        rows = [row.rstrip() for row in screen.display]
        used = [row for row in rows if row]
        assert used[-1].startswith("Buffer: ") and "| Served: " in used[-1], used[-3:]
        assert rows.index(used[-1]) == screen.cursor.y, "the dashboard is the row the cursor is on"
        assert sum("Buffer:" in row for row in rows) == 1, "no dashboard fragment left in the log"
        assert used[:-1] == expected_lines(12)
        assert len(used[-1]) < 120, "truncated to the terminal width, never wrapped"
        os.write(go_w, b"x")
        pump(None, 120)
        child.wait(timeout=60)
    finally:
        child.kill()
        for fd in (master, ready_r, ready_w, go_r, go_w):
            os.close(fd)
    rows = [row.rstrip() for row in screen.display if row.strip()]
    assert child.returncode == 0
    assert rows == [*expected_lines(20), "finished"], "dashboard removed; every line whole"


@pytest.fixture(scope="module")
def tensorboard_url(tmp_path_factory):
    """A real TensorBoard server (127.0.0.1, a free port) on the log dir ``actvpipe demo --log-dir``
    leaves: (base URL, log dir, the demo's stdout)."""
    import socket

    from tensorboard import program

    tmp_path = tmp_path_factory.mktemp("tensorboard")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACTVPIPE_CACHE": str(tmp_path)}
    log_dir = tmp_path / "tb"
    out = subprocess.run(
        [sys.executable, "-m", "actvpipe", "demo", "--log-dir", str(log_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(log_dir), "--host", "127.0.0.1", "--port", str(port)])
    return board.launch().rstrip("/"), log_dir, out.stdout


def tensorboard_json(url: str, path: str, **query: str):
    import json
    import urllib.parse
    import urllib.request

    with urllib.request.urlopen(f"{url}/data/plugin/{path}?{urllib.parse.urlencode(query)}", timeout=30) as r:
        return json.loads(r.read())


def test_demo_log_dir_is_served_by_a_real_tensorboard(tensorboard_url):
    """``actvpipe demo --log-dir`` prints the command to open its charts and leaves >= 100 points per
    tag; the server serves every tag and the custom-scalars layout over its HTTP API."""
    url, log_dir, stdout = tensorboard_url
    assert f"tensorboard --logdir {log_dir}" in stdout
    deadline = time.monotonic() + 60
    while True:  # the server loads the event files in the background
        tags = tensorboard_json(url, "scalars/tags")
        if tags and set(TAGS) <= set(next(iter(tags.values()))):
            break
        assert time.monotonic() < deadline, f"tags not served: {tags}"
        time.sleep(0.5)
    (run,) = tags
    for tag in (*TAGS, "buffer/low_watermark", "buffer/high_watermark"):
        points = tensorboard_json(url, "scalars/scalars", run=run, tag=tag)
        assert len(points) >= 100, (tag, len(points))
    layout = tensorboard_json(url, "custom_scalars/layout")
    charts = {chart["title"]: chart["multiline"]["tag"] for c in layout["category"] for chart in c["chart"]}
    throughput = next(tags for title, tags in charts.items() if title.startswith("throughput"))
    buffer = next(tags for title, tags in charts.items() if title.startswith("buffer"))
    assert {"rate/generated_per_s", "rate/served_per_s", "rate/disk_per_s"} <= set(throughput)
    assert {"buffer/fill_fraction", "buffer/low_watermark", "buffer/high_watermark"} <= set(buffer)
