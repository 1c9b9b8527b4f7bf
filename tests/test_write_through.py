"""Write-through cache: one pass streams and writes the file ``to_hdf5`` writes; a writer killed at
any instant leaves a valid, readable, continuable file; a restored loader continues it exactly."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import read_line
from torchdata.nodes import BaseNode, Loader

import actvpipe
from actvpipe.cache_restore import CachedThenComputed, split_plan
from actvpipe.generator import GeneratorError
from actvpipe.hdf5 import open_cache_file
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.loader_state import LoaderState
from actvpipe.records import RowBlock
from actvpipe.resume import ResumePlan
from actvpipe.spec import GeneratorOptions
from actvpipe.write_through import WriteThrough

CTX = 32


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:12]


@pytest.fixture(scope="module")
def stream(model_dir, docs):
    return actvpipe.stream(model_dir, docs, context_length=CTX)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stream):
    return stream.to_hdf5(tmp_path_factory.mktemp("ref") / "ref.h5", progress=False)


def assert_same_file(path, reference) -> None:
    """Equal to the reference file row for row (every dataset) and attribute for attribute (the
    full key set and every value)."""
    with h5py.File(path, "r") as got, h5py.File(reference, "r") as ref:
        assert set(got.attrs) == set(ref.attrs)
        for key in ref.attrs:
            assert np.array_equal(got.attrs[key], ref.attrs[key]), key
        assert got.attrs["complete"] and got.attrs["row_count"] == len(ref["activations"])
        for key in ("activations", "token_ids", "seq", "pos", "stats/mean", "stats/std", "stats/mean_norm"):
            assert got[key].shape == ref[key].shape, key
            assert np.array_equal(got[key][:], ref[key][:]), key
        assert got["stats"].attrs["rows"] == ref["stats"].attrs["rows"]


def test_a_pass_mixed_with_disk_rows_writes_exactly_the_live_rows(stream, reference, tmp_path):
    path = tmp_path / "live.h5"
    buffered = stream.buffer(3000, hdf5=reference, write_hdf5=path)
    with buffered.batch(500, with_tokens=True) as loader:
        sources = torch.cat([b.source for b in loader])
    assert (sources == 1).sum() == (sources == 0).sum() > 0, "disk rows were served too"
    assert_same_file(path, reference)
    # A later pass of the same stream finds the file complete and leaves it as it is.
    before = os.stat(path).st_mtime_ns
    with stream.buffer(3000, write_hdf5=path).batch(500) as loader:
        assert sum(len(b) for b in loader) == open_cache_file(str(path)).rows
    assert os.stat(path).st_mtime_ns == before


def test_statistics_and_normalisation_never_open_the_live_cache_for_writing(
    stream, reference, tmp_path, monkeypatch
):
    """Only the generator writes the write-through file. Before the identity (``StreamSpec``) and
    the generator options were split, ``stats()`` and ``normalize=`` built the generator's graph in
    the training process, write-through node included: a second writer on the live file."""
    opened = []
    create, reopen = Hdf5RowWriter.__init__, Hdf5RowWriter.continue_file.__func__

    def spy_create(self, path, *args, **kwargs):
        opened.append(str(path))
        create(self, path, *args, **kwargs)

    def spy_reopen(cls, path):
        opened.append(str(path))
        return reopen(cls, path)

    monkeypatch.setattr(Hdf5RowWriter, "__init__", spy_create)
    monkeypatch.setattr(Hdf5RowWriter, "continue_file", classmethod(spy_reopen))
    path = tmp_path / "live.h5"
    buffered = stream.buffer(3000, normalize="standardize", stats_rows=1000, write_hdf5=path)
    with buffered.batch(500) as loader:
        stats = loader.stats()
        served = sum(len(b) for b in loader)
    assert opened == [], "the training process opened a cache writer"
    assert stats.rows == 1000 and served == open_cache_file(str(reference)).rows
    assert_same_file(path, reference)


class CountedPulls(BaseNode):
    """The write-through node's real source, counting the blocks pulled from it."""

    def __init__(self, source: BaseNode):
        super().__init__()
        self.source, self.pulls = source, 0

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state)

    def next(self):
        block = next(self.source)
        self.pulls += 1
        return block

    def get_state(self) -> dict:
        return self.source.state_dict()


def test_blocks_are_committed_before_they_are_returned_and_written_during_the_next_forward(
    stream, reference, tmp_path
):
    """The generator's own graph in-process: each block comes out only once its rows are committed
    (``row_count`` covers it), and the next block has been computed by then (its write overlapped
    that forward); the file is the one ``to_hdf5`` writes."""
    path = tmp_path / "acts.h5"
    graph = stream.spec.rows_graph(ResumePlan.fresh(), GeneratorOptions(write_hdf5=str(path)))
    assert isinstance(graph, WriteThrough)
    graph.source = counted = CountedPulls(graph.source)
    returned, pulls = 0, []
    for block in Loader(graph):
        returned += len(block)
        assert graph._writer.file.attrs["row_count"] >= returned, "served before it was committed"
        pulls.append(counted.pulls)
        del block  # as the generator does once the block is in the buffer
    n = len(pulls)
    assert n >= 3 and pulls == [min(k + 2, n) for k in range(n)], "the next block was not computed first"
    assert_same_file(path, reference)
    capture = counted.source.source.capture  # RowFilter -> CaptureNode
    assert len(capture._stages._tensors) == 2, "one block in memory more than without the file"


def test_a_killed_run_restored_from_its_state_continues_the_file(stream, reference, tmp_path):
    path = tmp_path / "acts.h5"

    def make_loader():
        return stream.buffer(1500, warmup=0.9, write_hdf5=path).batch(100)

    loader = make_loader()
    with pytest.raises(GeneratorError, match="SIGKILL"), loader:
        batches = iter(loader)
        for _ in range(4):
            next(batches)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        for _ in range(20):
            next(batches)
        os.kill(loader.generator_pid, signal.SIGKILL)
        for _ in batches:
            pass
    partial = open_cache_file(str(path))
    total = open_cache_file(str(reference)).rows
    assert not partial.complete and 0 < partial.rows < total
    with h5py.File(reference, "r") as ref, h5py.File(path, "r", swmr=True) as got:
        n = partial.rows
        assert np.array_equal(got["activations"][:n], ref["activations"][:n])
        assert np.array_equal(got["seq"][:n], ref["seq"][:n])
    # The partial file is readable through the library as it is.
    with actvpipe.from_hdf5(path).buffer(1000).batch(500) as cached:
        assert sum(len(b) for b in cached) == partial.rows

    resumed = make_loader()
    resumed.load_state_dict(state)
    with resumed:
        served = sum(len(b) for b in resumed)
    assert served == total - 4 * 100
    assert_same_file(path, reference)


WRITER = """
import sys, numpy as np, torch
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.records import RowBlock
path, seed = sys.argv[1], int(sys.argv[2])
writer = (Hdf5RowWriter(path, (2, 3, 8), torch.float32, {"layers": [0, 1, 2], "d_model": 8}, durable=True)
          if seed == 0 else Hdf5RowWriter.continue_file(path))
rng = np.random.default_rng(seed)
print("ready", flush=True)
while True:
    n = int(rng.integers(1, 300))
    ids = np.arange(writer.rows, writer.rows + n)
    rows = torch.from_numpy(ids.astype(np.float32)).view(-1, 1, 1, 1).expand(n, 2, 3, 8).contiguous()
    writer.write(RowBlock(rows, {"row_id": ids, "seq": ids, "pos": ids, "token_ids": ids}))
"""


def test_a_writer_killed_at_any_instant_leaves_a_valid_continuable_file(tmp_path):
    """A writer appending as fast as it can, SIGKILLed at random instants 10 times: each time the file
    opens, says it is incomplete, and holds exactly rows 0..row_count-1; the next writer continues it."""
    path = tmp_path / "durable.h5"
    rng = np.random.default_rng(0)
    last = 0
    for seed in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(seed)], stdout=subprocess.PIPE, text=True
        )
        assert read_line(proc.stdout).strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        file = open_cache_file(str(path))
        assert not file.complete and file.rows >= last
        with h5py.File(path, "r", swmr=True) as f:
            expected = np.arange(file.rows)
            assert np.array_equal(f["activations"][: file.rows, 1, 2, 7], expected)
            assert np.array_equal(f["seq"][: file.rows], expected)
        last = file.rows
    assert last > 1000, "the writer committed rows between kills"

    def inspect() -> str:
        command = [sys.executable, "-m", "actvpipe", "inspect", str(path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout

    shown = inspect()  # the killed writer's file, as it is
    assert f"{last:,} rows of [2, 3, 8]" in shown and "complete: False" in shown
    writer = Hdf5RowWriter.continue_file(path)
    assert writer.rows == last
    writer.finish()
    file = open_cache_file(str(path))
    assert file.complete and file.rows == last
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["activations"][:, 0, 0, 0], np.arange(last))
        assert f["stats/mean"][0, 0, 0] == pytest.approx((last - 1) / 2)
    shown = inspect()
    assert f"{last:,} rows of [2, 3, 8]" in shown and "complete: True" in shown


def test_bad_write_targets_fail_before_any_work(stream, reference, model_dir, docs, tmp_path):
    with pytest.raises(FileNotFoundError, match="write_hdf5: no such directory"):
        stream.buffer(1000, write_hdf5=tmp_path / "missing" / "a.h5")
    other = actvpipe.stream(model_dir, docs, context_length=16)
    with pytest.raises(ValueError, match=r"another stream \(context_length: file 32, stream 16"):
        other.buffer(1000, write_hdf5=reference)
    ranked = actvpipe.stream(model_dir, docs, context_length=CTX, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"put \{rank\} in the path"):
        ranked.buffer(1000, write_hdf5=tmp_path / "a.h5")
    target = ranked.buffer(1000, write_hdf5=tmp_path / "a-{rank}.h5").options.write_hdf5
    assert target == str(tmp_path / "a-1.h5")
    with pytest.raises(TypeError, match="write_hdf5: this stream already reads HDF5 files"):
        actvpipe.from_hdf5(reference).buffer(1000, write_hdf5=tmp_path / "b.h5")


def test_a_file_of_other_weights_or_data_is_never_continued_nor_read_back(model_dir, docs, tmp_path):
    """The file records the content digest of the weights, tokenizer and data that made its rows:
    after the weights at the same path change, or the documents do, a stream with the same options
    refuses to continue it (so a restore never reads back rows another model computed). Before the
    digest only options were compared, and both streams accepted the file."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = shutil.copytree(model_dir, tmp_path / "model")
    path = tmp_path / "rows.h5"
    actvpipe.stream(model, docs[:3], context_length=CTX).to_hdf5(path, progress=False)
    other_docs = actvpipe.stream(model, [*docs[:2], docs[2] + " changed"], context_length=CTX)
    changed = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(model)
    other_weights = actvpipe.stream(model, docs[:3], context_length=CTX)
    for other in (other_docs, other_weights):
        with pytest.raises(ValueError, match=r"another stream \(content_digest: file '[0-9a-f]{32}', stream"):
            other.buffer(1000, write_hdf5=path)


def test_demo_streams_and_caches_then_completes_the_file(tmp_path):
    """``actvpipe demo --write-hdf5``: a short run leaves a valid, incomplete file and says so; a
    whole-pass run continues it to a complete file with no gap and no duplicate."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACTVPIPE_CACHE": str(tmp_path)}
    path = tmp_path / "demo.h5"
    command = [sys.executable, "-m", "actvpipe", "demo", "--write-hdf5", str(path), "--steps"]
    out = subprocess.run([*command, "10"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    first = open_cache_file(str(path))
    assert not first.complete and first.rows > 0 and first.row_shape == (2, 4, 64)
    assert f"cached {first.rows:,} rows in {path} (incomplete: --steps 0 streams the whole pass" in out.stdout
    out = subprocess.run([*command, "0"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    whole = open_cache_file(str(path))
    assert whole.complete and whole.rows > first.rows
    assert f"cached {whole.rows:,} rows in {path} (complete)" in out.stdout
    with h5py.File(path, "r") as f:
        ids = f["seq"][:] * 127 + f["pos"][:] - 1  # demo contexts of 128 tokens, BOS excluded
    assert np.array_equal(ids, np.arange(whole.rows)), "no gap and no duplicate across the two runs"


def test_a_restore_must_continue_the_file_its_run_wrote(stream, tmp_path):
    """A state restored with ``write_hdf5=`` naming a file without the rows served before the save
    is refused at ``load_state_dict``: the file would keep a gap."""
    with stream.buffer(1500).batch(100) as loader:
        batches = iter(loader)
        for _ in range(5):
            next(batches)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    fresh = stream.buffer(1500, write_hdf5=tmp_path / "new.h5").batch(100)
    with pytest.raises(ValueError, match=r"new.h5' holds 0 rows, but the state was saved after [\d,]+ rows"):
        fresh.load_state_dict(state)
    short = tmp_path / "short.h5"
    with stream.buffer(1500, write_hdf5=short).batch(100) as loader:  # a run that wrote a little
        next(iter(loader))
    written = open_cache_file(str(short)).rows
    writer = Hdf5RowWriter.continue_file(short)  # the file loses its last rows (copied before the save)
    writer.file.attrs["row_count"] = 10
    writer.file.close()
    loader = stream.buffer(1500, write_hdf5=short).batch(100)
    with pytest.raises(ValueError, match=r"short.h5' holds 10 rows"):
        loader.load_state_dict(state)
    assert written > 10


def test_a_restore_reads_the_buffered_rows_back_from_the_cache_and_computes_one_block(
    model_dir, texts, tmp_path
):
    """After five buffer turnovers the buffer holds survivors of many blocks. A restore with the
    write-through file reads them back from it and runs the model only from the block streaming
    continues from; the rest of the pass is bitwise the uninterrupted run's, and the file equals that
    run's file. The old code re-ran every block holding a buffered row: its ``computed`` count is
    several blocks over the bound asserted here."""
    ctx, gen_batch = CTX, 4
    stream = actvpipe.stream(
        model_dir, texts, context_length=ctx, generation_batch_size=gen_batch, deterministic=True
    )

    def make_loader(path):
        return stream.buffer(600, write_hdf5=path).batch(50, with_tokens=True)

    with make_loader(tmp_path / "whole.h5") as whole:
        expected = list(whole)
    path = tmp_path / "acts.h5"
    with make_loader(path) as first:
        batches = iter(first)
        head = [next(batches) for _ in range(60)]
        state = pickle.loads(pickle.dumps(first.state_dict()))
    saved = LoaderState.from_dict(state).buffer
    blocks = saved.blocks[0].numpy()
    assert len(blocks) >= 6, "the saved buffer must hold rows of many blocks for this test to mean anything"
    resumed = make_loader(path)
    resumed.load_state_dict(state)
    with resumed:
        rest = list(resumed)
        computed = resumed.counters()["computed"]
    got = head + rest
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.seq, b.seq) and torch.equal(a.pos, b.pos) and torch.equal(a.acts, b.acts)
    total = sum(len(b) for b in expected)
    continues_at = int(blocks[-1, 0]) * (ctx - 1)
    assert computed == total - continues_at, "computed more than the blocks from the continuation on"
    with h5py.File(path, "r") as got_file, h5py.File(tmp_path / "whole.h5", "r") as ref:
        for key in ("activations", "token_ids", "seq", "pos", "stats/mean"):
            assert np.array_equal(got_file[key][:], ref[key][:]), key


def test_rows_the_cache_lacks_are_recomputed_from_their_blocks(tmp_path):
    """``split_plan`` on a file missing the rows of context 3 (as a file with excluded tokens or a
    gap would): the buffered rows it holds are read back with their own meta and bytes, and the plan
    keeps exactly the block holding the missing rows plus the one streaming continues from."""
    ctx, first_pos, per_context = 5, 1, 4
    path = tmp_path / "cache.h5"
    writer = Hdf5RowWriter(path, (2, 1, 3), torch.float32, {"layers": [0], "d_model": 3}, durable=True)
    written = {}
    for seq in range(10):
        if seq == 3:
            continue
        ids = np.arange(seq * per_context, (seq + 1) * per_context)
        rows = torch.randn(per_context, 2, 1, 3)
        meta = {"row_id": ids, "seq": np.full(4, seq), "pos": np.arange(1, ctx), "token_ids": 100 + ids}
        writer.write(RowBlock(rows, meta))
        written.update(zip(ids.tolist(), rows, strict=True))
    blocks = np.array([[s, 10 * s, s] for s in (0, 2, 4, 6, 8)])
    buffered = np.array([5, 6, 13, 14, 29, 31])  # contexts 1, 3 (not in the file) and 7
    plan = ResumePlan(frontier=32, buffered=buffered, blocks=blocks)
    rest, cached = split_plan(str(path), plan, ctx, first_pos)
    assert np.array_equal(rest.buffered, [13, 14]) and rest.frontier == 32
    assert np.array_equal(rest.blocks, blocks[[1, 4]])
    assert np.array_equal(cached.meta["row_id"], [5, 6, 29, 31])
    assert np.array_equal(cached.meta["token_ids"], [105, 106, 129, 131])
    assert np.array_equal(cached.meta["block_seq"], [0, 0, 6, 6])
    assert np.array_equal(cached.meta["block_record"], [0, 0, 60, 60])
    writer.finish()
    node = CachedThenComputed(cached, _Empty())
    node.reset()
    block = next(node)
    out = np.empty((4, 2, 1, 3), np.float32)
    block.read_into(out.view(np.uint8), 0, 4)
    assert np.array_equal(out, torch.stack([written[i] for i in (5, 6, 29, 31)]).numpy())
    with pytest.raises(StopIteration):
        next(node)


class _Empty(BaseNode):
    def next(self):
        raise StopIteration

    def get_state(self):
        return {}
