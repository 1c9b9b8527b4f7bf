"""HDF5 cache: plain-h5py round trip, reading back through the buffer, resume, validation, CLI."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import h5py
import hdf5plugin
import numpy as np
import pytest
import torch
from conftest import assert_exact_batches, reference_pass

import actvpipe
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.records import RowBlock

CTX = 32


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:6]


@pytest.fixture(scope="module")
def reference(model_dir, docs):
    return reference_pass(model_dir, docs, CTX)


@pytest.fixture(scope="module")
def expected(reference):
    """Reference rows of the pass in generation order: context by context, positions 1..CTX-1."""
    contexts, rows = reference
    return contexts, rows[:, 1:].reshape(-1, *rows.shape[2:])


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory, model_dir, docs):
    path = tmp_path_factory.mktemp("cache") / "acts.h5"
    return actvpipe.stream(model_dir, docs, context_length=CTX).to_hdf5(path, progress=False)


def test_plain_h5py_reads_the_documented_rows(cache_file, expected):
    contexts, rows = expected
    with h5py.File(cache_file, "r") as f:
        acts = f["activations"]
        assert acts.shape == (len(rows), 2, 4, 64) and acts.dtype == np.float32
        assert acts.compression is None
        assert np.prod(acts.chunks) * 4 >= 1 << 20, "chunks of at least 1 MiB"
        torch.testing.assert_close(torch.from_numpy(acts[:]), rows, rtol=1e-4, atol=1e-5)
        n = len(contexts)
        assert np.array_equal(f["seq"][:], np.repeat(np.arange(n), CTX - 1))
        assert np.array_equal(f["pos"][:], np.tile(np.arange(1, CTX), n))
        assert np.array_equal(f["token_ids"][:], contexts[:, 1:].reshape(-1).numpy())
        attrs = dict(f.attrs)
    assert attrs["row_count"] == len(rows) and list(attrs["layers"]) == [0, 1, 2, 3]
    assert attrs["context_length"] == CTX and attrs["dtype"] == "float32" and attrs["storage"] == "native"
    for key in ("model", "config_hash", "capture", "packing", "tokenizer", "actvpipe_version", "format"):
        assert attrs[key], key
    assert not [p for p in os.listdir(cache_file.parent) if p.startswith(".")], "no temporary file left"


def test_writer_splits_blocks_across_whole_chunks(tmp_path):
    """Blocks smaller than, equal to and spanning chunks; a partial chunk at the end."""
    shape, sizes = (2, 4, 4096), [5, 40, 33, 64, 7]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn((sum(sizes), *shape), generator=gen)
    writer = Hdf5RowWriter(tmp_path / "w.h5", shape, torch.float32, {})
    assert writer.chunk_rows == 32
    at = 0
    for n in sizes:
        meta = {k: np.arange(at, at + n) for k in ("row_id", "token_ids", "seq", "pos")}
        writer.write(RowBlock(rows[at : at + n], meta))
        at += n
    with h5py.File(writer.finish(), "r") as f:
        assert torch.equal(torch.from_numpy(f["activations"][:]), rows)
        assert np.array_equal(f["seq"][:], np.arange(at))


def test_max_rows_float16_and_bfloat16(tmp_path, model_dir, docs, expected):
    rows = expected[1]
    stream = actvpipe.stream(model_dir, docs, context_length=CTX)
    half = stream.to_hdf5(tmp_path / "half.h5", max_rows=500, dtype=torch.float16, progress=False)
    with h5py.File(half, "r") as f:
        assert f["activations"].shape[0] == 500 and f["activations"].dtype == np.float16
        torch.testing.assert_close(
            torch.from_numpy(f["activations"][:]).float(), rows[:500], rtol=1e-2, atol=1e-3
        )
    brain = stream.to_hdf5(tmp_path / "bf16.h5", max_rows=700, dtype=torch.bfloat16, progress=False)
    with h5py.File(brain, "r") as f:
        assert f["activations"].dtype == np.uint16 and f.attrs["storage"] == "bfloat16-as-uint16"
        raw = torch.from_numpy(f["activations"][:].view(np.int16)).view(torch.bfloat16)
    torch.testing.assert_close(raw.float(), rows[:700], rtol=2e-2, atol=1e-3)
    with actvpipe.from_hdf5(brain).buffer(1000).batch(100, with_tokens=True) as loader:
        batches = list(loader)
    served = torch.cat([b.acts for b in batches])
    assert served.dtype == torch.bfloat16 and len(served) == 700
    order = torch.argsort(torch.cat([b.seq * CTX + b.pos for b in batches]))
    assert torch.equal(served[order].view(torch.int16), raw.view(torch.int16)), "bf16 round trip is bitwise"


def file_keys(batches) -> torch.Tensor:
    return torch.cat([b.seq * CTX + b.pos for b in batches])


def gzip_copy(path, out):
    """The same file with small gzip chunks: read through HDF5's filters, not raw chunk offsets."""
    with h5py.File(path, "r") as src, h5py.File(out, "w") as dst:
        dst.attrs.update(src.attrs)
        for key, data in src.items():
            if isinstance(data, h5py.Dataset):
                dst.create_dataset(key, data=data[:], chunks=(100, *data.shape[1:]), compression="gzip")
    return out


@pytest.mark.parametrize("layout", ["raw chunks", "gzip"])
def test_from_hdf5_serves_every_row_once(cache_file, expected, layout, tmp_path):
    rows = expected[1]
    path = cache_file if layout == "raw chunks" else gzip_copy(cache_file, tmp_path / "gz.h5")
    with actvpipe.from_hdf5(path).buffer(400).batch(64, with_tokens=True) as loader:
        batches = list(loader)
    keys = file_keys(batches)
    assert len(keys) == len(rows) and len(torch.unique(keys)) == len(keys)
    acts, seq, pos = (torch.cat([getattr(b, k) for b in batches]) for k in ("acts", "seq", "pos"))
    torch.testing.assert_close(acts, rows[seq * (CTX - 1) + pos - 1], rtol=1e-4, atol=1e-5)


def filtered_copy(path, out, layout: str):
    """The same file with chunks of 100 rows that the raw reader must not read as they lie: stored
    with HDF5's scale-offset filter or a plugin's (h5py reports neither as compression), or with one
    chunk never written (unallocated: HDF5 reads it as the fill value)."""
    with h5py.File(path, "r") as src, h5py.File(out, "w") as dst:
        dst.attrs.update(src.attrs)
        for key, data in src.items():
            if not isinstance(data, h5py.Dataset):
                continue
            if key != "activations":
                dst.create_dataset(key, data=data[:])
            elif layout == "scale-offset":
                dst.create_dataset(key, data=data[:], chunks=(100, *data.shape[1:]), scaleoffset=3)
            elif layout == "zstd plugin":
                dst.create_dataset(key, data=data[:], chunks=(100, *data.shape[1:]), **hdf5plugin.Zstd())
            else:
                made = dst.create_dataset(key, data.shape, data.dtype, chunks=(100, *data.shape[1:]))
                made[:100], made[200:] = data[:100], data[200:]
    return out


@pytest.mark.parametrize("layout", ["scale-offset", "zstd plugin", "unallocated chunk"])
def test_a_file_that_cannot_be_read_raw_is_served_as_hdf5_reads_it(cache_file, layout, tmp_path):
    """Every row served equals h5py's own read of that row. Before, the raw-chunk reader checked
    only gzip, lzf, szip and shuffle, so scale-offset or Zstandard bytes were served as rows, and an
    unallocated chunk (byte offset 0) served the file's header as rows. The generator process
    decodes the plugin's filter without being told to import hdf5plugin."""
    path = filtered_copy(cache_file, tmp_path / "filtered.h5", layout)
    with h5py.File(path, "r") as f:
        stored, seq, pos = f["activations"][:], f["seq"][:], f["pos"][:]
    row_of = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq, pos, strict=True))}
    with actvpipe.from_hdf5(path).buffer(400).batch(64, with_tokens=True) as loader:
        batches = list(loader)
    rows = [row_of[int(s), int(p)] for b in batches for s, p in zip(b.seq, b.pos, strict=True)]
    assert sorted(rows) == list(range(len(stored)))
    assert np.array_equal(torch.cat([b.acts for b in batches]).numpy(), stored[rows])
    if layout == "unallocated chunk":
        assert not stored[100:200].any() and stored[:100].any()


def test_several_files_by_list_and_glob(tmp_path, model_dir, texts, expected):
    a = actvpipe.stream(model_dir, texts[:6], context_length=CTX).to_hdf5(
        tmp_path / "part-0.h5", progress=False
    )
    b = actvpipe.stream(model_dir, texts[6:9], context_length=CTX).to_hdf5(
        tmp_path / "part-1.h5", progress=False
    )
    with h5py.File(a) as fa, h5py.File(b) as fb:
        total = torch.from_numpy(np.concatenate([fa["activations"][:], fb["activations"][:]]))
    for paths in ([a, b], str(tmp_path / "part-*.h5")):
        with actvpipe.from_hdf5(paths).buffer(2000).batch(500) as loader:
            served = torch.cat(list(loader))
        assert len(served) == len(total)
        torch.testing.assert_close(served.double().sum(0), total.double().sum(0))
        torch.testing.assert_close(served.double().pow(2).sum(0), total.double().pow(2).sum(0))


@pytest.mark.parametrize("midpoint", [5, 17])
def test_from_hdf5_resume_is_exact(cache_file, reference, midpoint):
    with actvpipe.from_hdf5(cache_file).buffer(400).batch(64, with_tokens=True) as loader:
        it = iter(loader)
        first = [next(it) for _ in range(midpoint)]
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    fresh = actvpipe.from_hdf5(cache_file).buffer(400).batch(64, with_tokens=True)
    fresh.load_state_dict(state)
    with fresh:
        rest = list(fresh)
    assert_exact_batches(first + rest, reference, CTX)
    with pytest.raises(ValueError, match="buffer_size: saved 400, now 500"):
        actvpipe.from_hdf5(cache_file).buffer(500).batch(64).load_state_dict(state)


def test_deterministic_from_hdf5_is_bitwise(cache_file):
    runs = []
    for _ in range(2):
        with actvpipe.from_hdf5(cache_file, deterministic=True).buffer(300).batch(50) as loader:
            runs.append(list(loader))
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))


def test_validation_names_the_file_and_the_problem(tmp_path, cache_file, model_dir, docs):
    with pytest.raises(FileNotFoundError, match=r"no such file .*missing.h5"):
        actvpipe.from_hdf5(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        actvpipe.from_hdf5(str(tmp_path / "nothing-*.h5"))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(ValueError, match=r"junk.h5.*not a readable HDF5 file"):
        actvpipe.from_hdf5(junk)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(cache_file.read_bytes()[: cache_file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.h5.*(not a readable HDF5 file|truncated)"):
        actvpipe.from_hdf5(cut)
    short = tmp_path / "short.h5"
    short.write_bytes(cache_file.read_bytes())
    with h5py.File(short, "a") as f:
        f.attrs["row_count"] = f.attrs["row_count"] + 10
    with pytest.raises(ValueError, match=r"short.h5.*truncated or incomplete"):
        actvpipe.from_hdf5(short)
    other = actvpipe.stream(model_dir, docs, context_length=CTX, layers=[1]).to_hdf5(
        tmp_path / "l1.h5", progress=False
    )
    with pytest.raises(ValueError, match=r"l1.h5.*does not match.*layers"):
        actvpipe.from_hdf5([cache_file, other])


def test_a_failed_write_leaves_no_file(tmp_path, model_dir, docs):
    stream = actvpipe.stream(model_dir, [*docs[:2], 12345], context_length=CTX)
    with pytest.raises(TypeError, match="not text"):
        stream.to_hdf5(tmp_path / "broken.h5", progress=False)
    assert os.listdir(tmp_path) == []


def test_cache_and_inspect_commands(tmp_path, model_dir, docs):
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(d.replace("\n", " ") for d in docs))
    out = tmp_path / "cli.h5"
    args = ["--model", str(model_dir), "--dataset", str(data), "--context-length", "16", "--out", str(out)]
    args += ["--max-rows", "300", "--dtype", "float16", "--layers", "0,2"]
    run = [sys.executable, "-m", "actvpipe"]
    done = subprocess.run([*run, "cache", *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    shown = subprocess.run([*run, "inspect", str(out)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "300 rows of [2, 2, 64] float16" in shown.stdout and "layers: [0, 2]" in shown.stdout
    bad = subprocess.run(
        [*run, "inspect", str(tmp_path / "nope.h5")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "no such file" in bad.stderr
