"""Run as a script: SIGKILL training processes at random moments and report what each left behind.

Usage: ``python kill_trainers.py TRIALS SEED MODEL_DIR H5_FILE``. This process starts a fork server
(by running one loader), then forks each trainer from itself, so every trainer forks its generators
from that server in milliseconds, as a real trainer's later generators do. Each trainer streams
pass after pass (live model or HDF5 reader, alternating) and is killed after a random delay
covering start-up, the first fill and steady serving. Each trainer has its own resource tracker,
as a real one has. Per trial one JSON line: whether its generators had exited and its shared block
was gone within 10 s. Last line: the fork server's PID.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import random
import signal
import sys
import time
from multiprocessing import resource_tracker

import psutil

import actvpipe
from actvpipe.demo import corpus_texts


def make_loader(kind: str, model_dir: str, h5: str):
    if kind == "live":
        texts = corpus_texts()[:12]
        return actvpipe.stream(model_dir, texts, context_length=32).buffer(1000).batch(100)
    return actvpipe.from_hdf5(h5).buffer(1000).batch(100)


def own_resource_tracker() -> None:
    """Forget the resource tracker inherited from this script, so that the trainer starts its own, as
    any training process does (a tracker removes what its process registered when it dies)."""
    tracker = resource_tracker.ResourceTracker()
    resource_tracker._resource_tracker = tracker
    for name in ("ensure_running", "register", "unregister", "getfd"):
        setattr(resource_tracker, name, getattr(tracker, name))


def trainer(kind: str, model_dir: str, h5: str) -> None:
    own_resource_tracker()
    with make_loader(kind, model_dir, h5) as loader:
        while True:
            for _ in loader:
                time.sleep(0.001)


def blocks_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"actvpipe_{pid}_")]


def main() -> None:
    trials, seed, model_dir, h5 = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rng = random.Random(seed)
    with make_loader("hdf5", model_dir, h5) as loader:  # starts this process's fork server
        next(iter(loader))
    server = psutil.Process(forkserver._forkserver._forkserver_pid)
    fork = mp.get_context("fork")
    for trial in range(trials):
        kind = ("live", "hdf5")[trial % 2]
        process = fork.Process(target=trainer, args=(kind, model_dir, h5), daemon=True)
        process.start()
        time.sleep(rng.uniform(0.0, 1.5 if kind == "live" else 0.4))
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        deadline = time.monotonic() + 10
        while (server.children() or blocks_of(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = {"generators": [p.pid for p in server.children()], "blocks": blocks_of(process.pid)}
        print(json.dumps({"trial": trial, "kind": kind, **left}), flush=True)
    print(json.dumps({"fork_server": server.pid}), flush=True)


if __name__ == "__main__":
    main()
