"""Long runs: memory, file descriptors and shared memory stay flat over many passes and checkpoints."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.soak import Sample, growth

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def test_half_minute_soak_stays_flat():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--minutes", "0.5", "--every", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert len([line for line in lines if "PSS" in line]) >= 5, "sampled over the whole half minute"
    summary = re.fullmatch(r"after \d+ s, (\d+) passes, [\d,]+ rows: flat", lines[-1])
    assert summary and int(summary.group(1)) >= 2, lines[-1]


def test_soak_verdict_names_what_grew():
    steady = [Sample(t, t // 10, 1000 * t, 500 * MiB, 20, 1, 20 * MiB) for t in range(0, 60, 5)]
    assert growth(steady) == []
    leaking = [*steady[:-1], Sample(60, 6, 60_000, 700 * MiB, 31, 2, 90 * MiB)]
    problems = " | ".join(growth(leaking))
    assert "PSS grew 200.0 MiB" in problems
    assert "file descriptors grew from 20 to 31" in problems
    assert "more than one shared block" in problems
    assert "shared memory grew 70.0 MiB" in problems
    assert growth(steady[:3]) == ["too few samples after the first pass: run longer or sample more often"]
    warming = [Sample(1, 0, 100, 500 * MiB, 24, 1, 20 * MiB), *steady[2:]]  # pass 0: spawned generator
    stepped = [warming[0], *[dataclasses.replace(s, fds=30) for s in warming[1:]]]
    assert growth(stepped) == [], "a step during the first pass is warm-up"
