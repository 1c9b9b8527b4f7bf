"""Normalisation statistics and normalised serving, against direct computation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import h5py
import pytest
import torch
from conftest import assert_exact_batches, reference_pass, resumed_run

import actvpipe
from actvpipe.loader_state import LoaderState
from actvpipe.stats import ActivationStats, Welford

CTX = 32


@pytest.fixture(scope="module")
def reference(model_dir, texts):
    return reference_pass(model_dir, texts[:4], CTX)


@pytest.fixture(scope="module")
def pass_rows(reference):
    return reference[1][:, 1:].reshape(-1, 2, 4, 64).double()


def direct(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"mean": rows.mean(0), "std": rows.std(0, correction=0), "mean_norm": rows.norm(dim=-1).mean(0)}


def assert_stats(stats: ActivationStats, rows: torch.Tensor) -> None:
    assert stats.rows == len(rows)
    for key, value in direct(rows).items():
        torch.testing.assert_close(getattr(stats, key).double(), value, rtol=1e-4, atol=1e-5, msg=key)


def test_welford_merges_uneven_blocks_exactly():
    rows = torch.randn(1000, 2, 3, 8, dtype=torch.float64) * 3 + 5
    welford = Welford()
    for lo, hi in ((0, 1), (1, 200), (200, 203), (203, 1000)):
        welford.update(rows[lo:hi])
    assert_stats(welford.result(), rows.float().double())
    again = ActivationStats.from_json(welford.result().to_json())
    assert again.rows == 1000 and torch.equal(again.mean, welford.result().mean)


def test_stream_stats_over_the_first_rows(model_dir, texts, pass_rows):
    stream = actvpipe.stream(model_dir, texts[:4], context_length=CTX)
    assert_stats(stream.stats(rows=500), pass_rows[:500])
    assert_stats(stream.stats(rows=10**9), pass_rows)  # a shorter pass: all of it


@pytest.mark.parametrize("kind", ["sqrt_d", "standardize"])
def test_normalised_serving_and_exact_resume(model_dir, texts, reference, pass_rows, kind):
    stats = direct(pass_rows[:300])

    def loader():
        stream = actvpipe.stream(model_dir, texts[:4], context_length=CTX)
        return stream.buffer(400, normalize=kind, stats_rows=300).batch(100, with_tokens=True)

    batches, state = resumed_run(loader, 2)
    assert LoaderState.from_dict(state).find("normalization")["normalization"]["kind"] == kind
    assert_stats(loader().stats(), pass_rows[:300])  # computed without starting anything
    contexts, rows = reference
    if kind == "sqrt_d":
        normalised = rows.double() * (math.sqrt(64) / stats["mean_norm"])[..., None]
        norms = torch.cat([b.acts for b in batches]).norm(dim=-1)
        assert abs(float(norms.mean()) - 8.0) < 1.0
    else:
        normalised = (rows.double() - stats["mean"]) / stats["std"]
    assert_exact_batches(batches, (contexts, normalised.float()), CTX, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="normalize"):
        actvpipe.stream(model_dir, texts[:4], context_length=CTX).buffer(100, normalize="l2")


def test_cache_file_keeps_stats_and_cli_prints_them(tmp_path, model_dir, texts, pass_rows):
    path = actvpipe.stream(model_dir, texts[:4], context_length=CTX).to_hdf5(
        tmp_path / "a.h5", progress=False
    )
    with h5py.File(path, "r") as f:
        stored = ActivationStats.from_dict(
            {"rows": f["stats"].attrs["rows"], **{k: f["stats"][k][:] for k in ("mean", "std", "mean_norm")}}
        )
    assert_stats(stored, pass_rows)
    out = subprocess.run(
        [sys.executable, "-m", "actvpipe", "stats", str(path), "--rows", "400"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert_stats(ActivationStats.from_dict(json.loads(out.stdout)), pass_rows[:400])
    assert "400 rows; mean norm per capture point and layer" in out.stderr
