"""Resource limits: the statistics pass's memory, thousands of cache files under a low descriptor
limit, and files left by writers that were killed."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py

import actvpipe
from actvpipe.locations import partial_path, remove_dead_partials

WELFORD_PEAK = """
import resource, sys, torch
from actvpipe.stats import Welford
rows = torch.randn(4096, 2, 12, 768)  # GPT-2-small rows: 302 MB in float32
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Welford().update(rows)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_statistics_of_a_gpt2_shaped_block_stay_within_a_bounded_peak():
    """Welford works in float64 pieces of at most 64 MB. Before, a whole block went to float64 at
    once (here 604 MB per temporary, about 2 GB more at the peak; 4.8 GB per temporary for a
    default GPT-2 block)."""
    out = subprocess.run([sys.executable, "-c", WELFORD_PEAK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 400 << 20, f"peak grew by {int(out.stdout) / 2**20:.0f} MiB"


MANY_FILES = """
import resource, sys, actvpipe
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
paths = sys.argv[1]
with actvpipe.from_hdf5(paths).buffer(2000).batch(500, with_tokens=True) as loader:
    rows = sum(len(b) for b in loader)
print(rows)
"""


def test_two_thousand_cache_files_are_served_under_a_low_descriptor_limit(tmp_path, model_dir, texts):
    """Files are opened when first read and at most 32 stay open. Before, the reader opened every
    file twice at its start: about 120 files reached a limit of 256 descriptors."""
    stream = actvpipe.stream(model_dir, texts[:1], context_length=16)
    written = stream.to_hdf5(tmp_path / "written.h5", max_rows=10, progress=False)
    one = tmp_path / "one.h5"
    with h5py.File(written, "r") as src, h5py.File(one, "w") as dst:  # small chunks: small files
        dst.attrs.update(src.attrs)
        for key in ("activations", "token_ids", "seq", "pos"):
            dst.create_dataset(key, data=src[key][:], chunks=(4, *src[key].shape[1:]))
    rows = actvpipe.from_hdf5(one).spec.files[0].rows
    for i in range(2000):
        shutil.copy2(one, tmp_path / f"part-{i:04d}.h5")
    out = subprocess.run(
        [sys.executable, "-c", MANY_FILES, str(tmp_path / "part-*.h5")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 2000 * rows


def test_partial_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"abc.{dead.pid}.partial"
    left.mkdir()
    (left / "data.arrow").write_bytes(b"x")
    pickled = tmp_path / f"def.pkl.{dead.pid}.partial"
    pickled.write_bytes(b"x")
    mine = partial_path(tmp_path / "ghi")
    mine.write_bytes(b"x")
    assert sorted(remove_dead_partials(tmp_path)) == sorted([left, pickled])
    assert not left.exists() and not pickled.exists() and mine.exists()
