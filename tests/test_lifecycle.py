"""The generator is a real process sharing real memory, and nothing outlives the loader."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

import actvpipe
from actvpipe.shm import SharedRowBuffer


def shm_entries(pid: int | None = None) -> set[str]:
    prefix = f"actvpipe_{pid}_" if pid else "actvpipe_"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def small_stream(model_dir, texts):
    return actvpipe.stream(model_dir, texts[:8], context_length=32)


def test_generator_is_another_process_mapping_the_shared_buffer(small_stream):
    with small_stream.buffer(5000).batch(100) as loader:
        pid = loader.generator_pid
        assert pid is not None and pid != os.getpid()
        child = psutil.Process(pid)
        assert child.ppid() == os.getpid()
        next(iter(loader))  # by now the child has attached
        (name,) = shm_entries(os.getpid())
        assert any(name in m.path for m in child.memory_maps()), "the child must map the same shared block"
    assert wait_gone(pid)


def test_start_returns_before_any_row_exists(small_stream):
    loader = small_stream.buffer(5000).batch(100)
    try:
        assert loader.start() is loader
        assert loader.counters()["written"] == 0
        assert psutil.Process(loader.generator_pid).is_running()
    finally:
        loader.close()


def test_buffer_pickles_as_name_and_shape_only():
    big = SharedRowBuffer.create(200_000, (2, 12, 768), torch.float32, lock=None)  # 14.7 GB, untouched
    try:
        payload = pickle.dumps(big)
        assert len(payload) < 1024
        twin = pickle.loads(payload)
        twin.rows[123, 1, 5, 7] = 42.0
        assert big.rows[123, 1, 5, 7] == 42.0, "the unpickled buffer must share the same memory"
    finally:
        big.unlink()


def test_close_frees_shared_memory_and_stops_the_generator(small_stream):
    loader = small_stream.buffer(5000).batch(100).start()
    pid = loader.generator_pid
    assert shm_entries(os.getpid())
    loader.close()
    assert not shm_entries(os.getpid())
    assert wait_gone(pid)


def test_exception_inside_with_block_cleans_up(small_stream):
    with pytest.raises(KeyError), small_stream.buffer(5000).batch(100) as loader:
        pid = loader.generator_pid
        next(iter(loader))
        raise KeyError("training step failed")
    assert not shm_entries(os.getpid())
    assert wait_gone(pid)


def test_garbage_collected_loader_cleans_up(small_stream):
    loader = small_stream.buffer(5000).batch(100)
    it = iter(loader)
    next(it)
    pid = loader.generator_pid
    del loader, it
    gc.collect()
    assert not shm_entries(os.getpid())
    assert wait_gone(pid)


def test_interpreter_exit_without_close_cleans_up(model_dir, texts, tmp_path):
    script = textwrap.dedent(
        f"""
        import actvpipe, os, sys
        loader = actvpipe.stream({str(model_dir)!r}, {texts[:8]!r}, context_length=32).buffer(5000).batch(100)
        next(iter(loader))
        print(os.getpid(), loader.generator_pid, flush=True)
        """
    )  # no __main__ guard on purpose: the generator must not rerun the script
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    parent, child = map(int, out.stdout.split())
    assert wait_gone(child)
    assert not shm_entries(parent)


def test_generator_exception_reaches_the_training_loop(model_dir, texts):
    bad = [*texts[:3], 12345]  # the first document is fine, so the error happens in the generator
    loader = actvpipe.stream(model_dir, bad, context_length=32).buffer(100_000).batch(10)
    with pytest.raises(actvpipe.GeneratorError, match="TypeError") as info, loader:
        list(loader)
    assert "Traceback" in str(info.value)


def test_generator_killed_by_signal_is_an_error_not_a_hang(model_dir, texts):
    loader = actvpipe.stream(model_dir, texts * 20, context_length=32).buffer(1000).batch(500)
    with pytest.raises(actvpipe.GeneratorError, match="SIGKILL"), loader:
        it = iter(loader)
        next(it)
        os.kill(loader.generator_pid, signal.SIGKILL)
        for _ in it:
            pass


TRAINER = """
import actvpipe, os, time
with actvpipe.stream({model!r}, {docs!r}, context_length=32).buffer(2000).batch(100) as loader:
    it = iter(loader)
    next(it)
    print(os.getpid(), loader.generator_pid, flush=True)
    while True:
        for _ in loader:
            time.sleep(0.01)
"""


def start_trainer(model_dir, texts) -> tuple[subprocess.Popen, int, int]:
    script = TRAINER.format(model=str(model_dir), docs=texts[:8])
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal would give it
    )
    parent, child = map(int, proc.stdout.readline().split())
    return proc, parent, child


def test_sigkilled_training_process_leaves_nothing_behind(model_dir, texts):
    proc, parent, child = start_trainer(model_dir, texts)
    assert shm_entries(parent)
    proc.kill()
    proc.wait(timeout=10)
    assert wait_gone(child, timeout=10), "the generator notices its trainer is gone"
    deadline = time.monotonic() + 10
    while shm_entries(parent) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not shm_entries(parent), "the shared block is removed without the trainer"


def test_ctrl_c_exits_cleanly(model_dir, texts):
    proc, parent, child = start_trainer(model_dir, texts)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the trainer and its generator
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err and "GeneratorError" not in err, err
    assert wait_gone(child, timeout=10)
    assert not shm_entries(parent)
