"""Restore checks: a saved state resumes only onto the same arguments, data, weights, tokenizer and
revision, and rows that changed underneath it are refused rather than served."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_resume import BATCH, BUFFER, CTX, GEN_BATCH, make_loader, save_mid_pass

import actvpipe


@pytest.fixture(scope="module")
def docs(texts):
    return texts[:10]


def test_restoring_into_a_loader_with_other_arguments_lists_each_difference(model_dir, docs):
    with make_loader(model_dir, docs) as loader:
        _, _, state = save_mid_pass(loader, 2)
    other = make_loader(model_dir, docs, context_length=48, layers=[0, 1], seed=7, deterministic=True)
    with pytest.raises(ValueError, match="different arguments") as info:
        other.load_state_dict(state)
    assert other.generator_pid is None, "the mismatch must be found before any process starts"
    for line in (
        "context_length: saved 32, now 48",
        "layers: saved [0, 1, 2, 3], now [0, 1]",
        "seed: saved 0, now 7",
        "deterministic: saved False, now True",
    ):
        assert line in str(info.value)


def test_restoring_with_another_dataset_or_model_says_what_differs(model_dir, docs, tmp_path):
    with make_loader(model_dir, docs) as loader:
        _, _, state = save_mid_pass(loader, 2)
    with pytest.raises(ValueError, match=r"dataset: saved '<list of 10 documents"):
        make_loader(model_dir, docs[1:]).load_state_dict(state)
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(model_dir).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model: saved"):
        make_loader(tmp_path, docs).load_state_dict(state)


def test_restoring_after_the_data_or_the_weights_changed_names_what_changed(model_dir, docs, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    data, weights = tmp_path / "docs.jsonl", tmp_path / "model"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    model = AutoModel.from_pretrained(model_dir)
    model.save_pretrained(weights)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(weights)
    with make_loader(weights, str(data)) as loader:
        _, _, state = save_mid_pass(loader, 2)
    make_loader(weights, str(data)).load_state_dict(state)  # unchanged: restores

    data.write_text(data.read_text().replace(docs[3][:20], docs[3][:20].upper()))
    with pytest.raises(ValueError, match=rf"dataset_content\[{re.escape(repr(str(data)))}\]: saved"):
        make_loader(weights, str(data)).load_state_dict(state)

    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight.mul_(1.01)
    model.save_pretrained(weights)
    with pytest.raises(ValueError, match=r"model_content\['model.safetensors'\]: saved") as info:
        make_loader(weights, str(data)).load_state_dict(state)
    assert "dataset_content" in str(info.value), "rewriting a file changes its modification time"


def test_the_fingerprint_and_file_attributes_hold_what_rows_are_and_nothing_of_how_they_are_made(
    model_dir, docs, tmp_path
):
    """The identity (``stream.spec``) lists exactly what a row depends on; the generator options
    (device, watermarks, write-through file) live apart and reach neither. Before the identity and
    options were split, the spec carried ``device``, ``watermarks``, ``threads`` and ``write_hdf5``."""
    stream = actvpipe.stream(model_dir, docs, context_length=CTX, modules=("h.{i}.ln_2", "h.{i}.mlp"))
    buffered = stream.buffer(1000, write_hdf5=tmp_path / "c.h5")
    identity = {
        "model", "dataset", "context_length", "layers", "capture", "modules", "generation_batch_size",
        "dtype", "seed", "exclude_bos", "deterministic", "model_dtype", "exclude_tokens", "packing",
        "rank", "world_size",
    }  # fmt: skip
    assert set(buffered.spec.fingerprint()) == identity | {
        "model_content",
        "tokenizer_content",
        "dataset_content",
    }
    in_files = identity - {"generation_batch_size", "dtype", "seed", "deterministic", "rank", "world_size"}
    assert in_files | {"d_model"} <= set(buffered.spec.file_attrs())
    assert not {"device", "watermarks", "write_hdf5"} & {f.name for f in dataclasses.fields(buffered.spec)}
    assert buffered.options.write_hdf5 == str(tmp_path / "c.h5") and buffered.options.device == "cpu"


def test_a_loaded_model_is_fingerprinted_by_its_parameters(model_dir, docs):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)

    def fingerprint():
        return actvpipe.stream(model, docs, tokenizer=str(model_dir), context_length=CTX).spec.fingerprint()

    before = fingerprint()
    assert fingerprint() == before
    with torch.no_grad():
        model.h[2].mlp.c_proj.weight.mul_(1.01)
    after = fingerprint()
    assert after["model_content"] != before["model_content"]
    assert {k: v for k, v in after.items() if k != "model_content"} == {
        k: v for k, v in before.items() if k != "model_content"
    }


def test_a_state_restores_only_with_the_same_tokenizer_batch_size_and_drop_last(model_dir, docs, tmp_path):
    """Before, the tokenizer was not in the fingerprint (another tokenizer with the same model
    resumed), nor were ``batch_size`` and ``drop_last``."""
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(model_dir)
    other.add_tokens(["<an extra token>"])
    other.save_pretrained(tmp_path / "other")
    with make_loader(model_dir, docs) as loader:
        next(iter(loader))
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    retokenized = actvpipe.stream(
        model_dir,
        docs,
        tokenizer=str(tmp_path / "other"),
        context_length=CTX,
        generation_batch_size=GEN_BATCH,
    )
    with pytest.raises(ValueError, match="tokenizer_content: saved"):
        retokenized.buffer(BUFFER).batch(BATCH, with_tokens=True).load_state_dict(state)
    stream = actvpipe.stream(model_dir, docs, context_length=CTX, generation_batch_size=GEN_BATCH)
    with pytest.raises(ValueError, match=f"batch_size: saved {BATCH}, now {BATCH // 2}"):
        stream.buffer(BUFFER).batch(BATCH // 2, with_tokens=True).load_state_dict(state)
    with pytest.raises(ValueError, match="drop_last: saved False, now True"):
        stream.buffer(BUFFER).batch(BATCH, drop_last=True, with_tokens=True).load_state_dict(state)


def test_deterministic_mode_refuses_the_device_that_timing_decides():
    """``device="auto"`` (only kept where CUDA is) moves the forward between GPU and CPU on the
    buffer's fill: not bitwise. Before, ``deterministic=True`` accepted it."""
    from actvpipe.checks import check_deterministic_device

    with pytest.raises(ValueError, match="with deterministic=True pass device='cuda'"):
        check_deterministic_device(True, "auto")
    for deterministic, device in ((True, "cpu"), (True, "cuda"), (False, "auto")):
        check_deterministic_device(deterministic, device)


def test_rows_whose_tokens_changed_at_the_same_positions_are_refused_on_restore(
    model_dir, tmp_path, monkeypatch
):
    """A pretokenized file changed in its middle, same size and modification time: its fingerprint
    (size, time, first and last bytes; 512 here instead of a MiB, standing for a large file) does not
    see it. The restore regenerates rows at the saved positions and checks their tokens. Before,
    only the positions were checked, and the changed rows were served as if they were the saved."""
    monkeypatch.setattr("actvpipe.fingerprint.EDGE", 512)
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.jsonl"
    lines = [json.dumps({"input_ids": rng.integers(100, 1000, 40).tolist()}) for _ in range(60)]
    path.write_text("".join(line + "\n" for line in lines))

    def make():
        stream = actvpipe.stream(model_dir, str(path), context_length=CTX, generation_batch_size=2)
        return stream.buffer(400).batch(50, with_tokens=True)

    with make() as loader:
        next(iter(loader))
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    stat = os.stat(path)
    text = path.read_bytes()
    middle = re.sub(rb"\d{3}", lambda m: b"%03d" % (100 + (int(m.group()) - 99) % 900), text[512:-512])
    path.write_bytes(text[:512] + middle + text[-512:])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with make() as resumed:
        resumed.load_state_dict(state)  # the fingerprint matches
        with pytest.raises(RuntimeError, match="hold other tokens than the saved ones"):
            next(iter(resumed))


HUB_REVISIONS = """
import os, shutil, sys
from pathlib import Path
model, cache = Path(sys.argv[1]), Path(os.environ["HF_HUB_CACHE"])
repo = cache / "models--actvpipe-test--tiny"
for commit in ("1" * 40, "2" * 40):
    shutil.copytree(model, repo / "snapshots" / commit)
(repo / "refs").mkdir()
import actvpipe

def fingerprinted_state(commit):
    (repo / "refs" / "main").write_text(commit)
    stream = actvpipe.stream("actvpipe-test/tiny", ["a document", "another one"], context_length=16)
    return stream.buffer(200).batch(50)

first = fingerprinted_state("1" * 40)
state = first.state_dict()
print(state["fingerprint"]["model_content"])
try:
    fingerprinted_state("2" * 40).load_state_dict(state)
except ValueError as error:
    print(error)
"""


def test_a_hub_model_is_fingerprinted_by_the_revision_it_resolved_to(model_dir, tmp_path):
    """A hub id resolves to a commit; a state saved at one commit is refused at another, even with
    the same config. Before, a hub model was identified by its config alone. (Offline: a hub cache
    with two snapshots of the demo model, ``refs/main`` moved from one to the other.)"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run(
        [sys.executable, "-c", HUB_REVISIONS, str(model_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    content, *error = out.stdout.splitlines()
    assert content.endswith("@" + "1" * 40)
    assert "model_content: saved" in "\n".join(error) and "2" * 40 in "\n".join(error)


HUB_DATASET = """
import os, sys, json
import torch
sys.path.insert(0, sys.argv[3])
from fake_hub import FakeHub

def jsonl(docs):
    return "".join(json.dumps({"text": d}) + "\\n" for d in docs).encode()

first, second = json.loads(sys.argv[2])
hub = FakeHub("actvpipe-test/docs")
os.environ["HF_ENDPOINT"] = hub.url
pinned = hub.push({"train.jsonl": jsonl(first)})
import actvpipe

def make(dataset):
    stream = actvpipe.stream(sys.argv[1], dataset, context_length=32, deterministic=True, seed=3)
    return stream.buffer(600).batch(100, with_tokens=True)

def full_pass(loader):
    with loader:
        batches = list(loader)
    return {f: torch.cat([getattr(b, f) for b in batches]) for f in ("seq", "pos", "acts", "token_ids")}

loader = make("actvpipe-test/docs")
moved = hub.push({"train.jsonl": jsonl(second)})  # after stream(): the generator still reads ``pinned``
state = loader.state_dict()
torch.save({"hub": full_pass(loader), "first": full_pass(make(first)), "second": full_pass(make(second))},
           sys.argv[4])
print(state["fingerprint"]["dataset_content"])
try:
    make("actvpipe-test/docs").load_state_dict(state)
except ValueError as error:
    print(error)
print(pinned, moved)
"""


def test_a_hub_dataset_is_read_at_its_resolved_commit_and_fingerprinted_by_it(model_dir, texts, tmp_path):
    """``stream()`` resolves a hub dataset to a commit: the generator reads that commit even after
    ``main`` moved on, and a state saved on it is refused at the new one. Before, a hub dataset was
    identified by its id alone: the generator read whatever ``main`` was when it started, and a
    state resumed onto changed data. (A local fake hub serves the repository.)"""
    first, second = texts[:6], texts[6:12]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    env |= {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    args = [
        str(model_dir),
        json.dumps([first, second]),
        os.path.dirname(__file__),
        str(tmp_path / "passes.pt"),
    ]
    out = subprocess.run(
        [sys.executable, "-c", HUB_DATASET, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    content, *error, commits = out.stdout.splitlines()
    pinned, moved = commits.split()
    assert content == f"actvpipe-test/docs@{pinned}"
    changed = f"dataset_content: saved 'actvpipe-test/docs@{pinned}', now 'actvpipe-test/docs@{moved}'"
    assert changed in "\n".join(error)
    passes = torch.load(tmp_path / "passes.pt")
    hub, same, other = passes["hub"], passes["first"], passes["second"]
    for field in ("seq", "pos", "acts", "token_ids"):
        assert torch.equal(hub[field], same[field]), field
    n = min(len(hub["token_ids"]), len(other["token_ids"]))
    assert not torch.equal(hub["token_ids"][:n], other["token_ids"][:n]), "the moved main was read"
