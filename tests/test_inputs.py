"""Every accepted dataset form works; every bad input fails early with a message naming the fix."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

import actvpipe
from actvpipe.documents import document_blocks, resolve_dataset
from actvpipe.text import batch_encoder

CTX = 32


def first_batch(stream, batch=64):
    with stream.buffer(2000).batch(batch, with_tokens=True) as loader:
        return next(iter(loader))


def write_forms(tmp_path, texts):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    (tmp_path / "docs.txt").write_text("\n".join(t.replace("\n", " ") for t in texts))
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "docs.parquet"))
    (tmp_path / "dir").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "dir" / f"{i:03d}.json").write_text(json.dumps({"text": t}))


def test_every_dataset_form_yields_the_same_documents(tmp_path, texts):
    docs = texts[:6]
    write_forms(tmp_path, docs)
    flat = [t.replace("\n", " ") for t in docs]
    forms = {
        "list": (docs, "text", docs),
        "jsonl": (tmp_path / "docs.jsonl", "body", docs),
        "txt": (str(tmp_path / "docs.txt"), "text", flat),
        "parquet": (str(tmp_path / "docs.parquet"), "text", docs),
        "directory": (str(tmp_path / "dir"), "text", docs),
        "Dataset": (datasets.Dataset.from_dict({"text": docs}), "text", docs),
        "IterableDataset": (datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(), "text", docs),
    }

    def offsets(lines):
        return [int(x) for x in np.cumsum([0, *(len(line.encode()) + 1 for line in lines[:-1])])]

    records = {  # a local file's record is its address, file << 40 | byte offset (or row)
        "jsonl": offsets([json.dumps({"body": t}) for t in docs]),
        "txt": offsets(flat),
        "directory": [k << 40 for k in range(len(docs))],
    }
    for name, (dataset, column, expected) in forms.items():
        source = resolve_dataset(dataset, column)
        got = [d for block, _ in document_blocks(source, block_docs=4) for d in block]
        assert [text for _, text in got] == expected, name
        assert [record for record, _ in got] == records.get(name, list(range(len(docs)))), name
        resumed = [d for block, _ in document_blocks(source, block_docs=4, start=got[2][0]) for d in block]
        assert resumed == got[2:], name


def test_stream_over_a_jsonl_file_serves_rows(tmp_path, model_dir, texts):
    write_forms(tmp_path, texts[:6])
    batch = first_batch(
        actvpipe.stream(model_dir, tmp_path / "docs.jsonl", text_column="body", context_length=CTX)
    )
    assert batch.acts.shape == (64, 2, 4, 64)
    assert torch.isfinite(batch.acts).all()


def test_fast_batch_encoding_gives_the_tokenizer_call_s_ids(model_dir, texts):
    """The packer's backend batch call returns what ``tokenizer(texts)`` returns, special-token
    text, odd whitespace and non-ASCII included, and after a truncating call left its mark."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    odd = ["a <|endoftext|> b<|endoftext|>", "  two  spaces\t\r\n", "naïve 東京 🙂", "\n\n", "x" * 5000]
    samples = [*texts, *odd]
    expected = [list(ids) for ids in tokenizer(samples, add_special_tokens=False)["input_ids"]]
    assert batch_encoder(tokenizer)(samples) == expected
    tokenizer(samples, truncation=True, max_length=8)
    assert batch_encoder(tokenizer)(samples) == expected


def test_loaded_model_and_tokenizer_objects(model_dir, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_object = first_batch(
        actvpipe.stream(model, texts[:4], tokenizer=tokenizer, context_length=CTX, seed=1)
    )
    by_path = first_batch(actvpipe.stream(model_dir, texts[:4], context_length=CTX, seed=1))
    assert torch.equal(by_object.seq, by_path.seq) and torch.equal(by_object.pos, by_path.pos)
    torch.testing.assert_close(by_object.acts, by_path.acts)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"model": "./no/such/model"}, FileNotFoundError, ["model", "no such directory"]),
        ({"dataset": "./no/such/file.jsonl"}, FileNotFoundError, ["dataset", "no such file"]),
        ({"text_column": "content"}, ValueError, ["no column 'content'", "text_column="]),
        ({"context_length": 100_000}, ValueError, ["context_length", "maximum of 256"]),
        ({"context_length": 1}, ValueError, ["context_length", "at least 2"]),
        ({"layers": [0, 4]}, ValueError, ["layers", "[4]", "0..3"]),
        ({"layers": [-1]}, ValueError, ["layers", "0..3"]),
        ({"generation_batch_size": 0}, ValueError, ["generation_batch_size", "positive"]),
        ({"dtype": torch.int64}, TypeError, ["dtype", "floating"]),
        ({"device": "tpu"}, ValueError, ["device", "'cpu'"]),
        ({"dataset": iter(["a b c"])}, TypeError, ["one-shot iterator", "list of strings"]),
        ({"dataset": []}, ValueError, ["dataset", "empty"]),
    ],
)
def test_bad_stream_arguments_fail_before_any_work(model_dir, texts, kwargs, error, words):
    args = {"model": model_dir, "dataset": texts[:2], "context_length": CTX, **kwargs}
    if "text_column" in kwargs:
        args["dataset"] = datasets.Dataset.from_dict({"text": texts[:2]})
    with pytest.raises(error) as info:
        actvpipe.stream(**args)
    for word in words:
        assert word in str(info.value)


def test_directory_that_is_not_a_model(tmp_path, texts):
    with pytest.raises(ValueError, match=r"not a saved model.*save_pretrained"):
        actvpipe.stream(tmp_path, texts[:2])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(model_dir, texts):
    with pytest.raises(ValueError, match=r"CUDA is not available.*device='cpu'"):
        actvpipe.stream(model_dir, texts[:2], device="cuda")


def test_buffer_and_batch_sizes(model_dir, texts):
    stream = actvpipe.stream(model_dir, texts[:2], context_length=CTX)
    with pytest.raises(
        ValueError, match=r"batch_size: 200 is larger than the buffer \(100 rows\).*size >= 200"
    ):
        stream.buffer(100).batch(200)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="size: expected a positive integer"):
            stream.buffer(bad)
    with pytest.raises(ValueError, match="warmup"):
        stream.buffer(100, warmup=1.5)
    shm = os.statvfs("/dev/shm")
    too_many = 2 * shm.f_bavail * shm.f_frsize // (2 * 4 * 64 * 4)
    with pytest.raises(ValueError, match=r"of shared memory but /dev/shm has [\d.,]+ GiB free.*--shm-size"):
        stream.buffer(too_many)


def test_hub_model_offline_names_the_offline_alternative():
    with pytest.raises(ValueError) as info:
        actvpipe.gpt2_stream()
    message = str(info.value)
    assert "openai-community/gpt2" in message and "Hugging Face hub" in message
    assert "actvpipe.demo_stream()" in message


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("broken.jsonl", b"{not json at all\n", ["could not read", "broken.jsonl", "format"]),
        ("broken.parquet", b"these bytes are not parquet", ["could not read", "broken.parquet"]),
    ],
)
def test_unreadable_dataset_file_fails_before_any_work(tmp_path, model_dir, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        actvpipe.stream(model_dir, path, context_length=CTX)
    for word in words:
        assert word in str(info.value)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        actvpipe.stream(model_dir, empty, context_length=CTX)


def test_large_in_memory_data_goes_to_generators_as_a_memory_map(model_dir, texts):
    """A list over 4 MiB and an in-memory ``datasets.Dataset`` are written once to Arrow files and
    memory-mapped, an ``IterableDataset`` pickled once to a file: the spec a generator receives
    stays small, later starts take milliseconds, and the documents read back are the same, in the
    same records."""
    docs = [f"{texts[i % len(texts)]} {i}" for i in range(12_000)]
    assert sum(map(len, docs)) > 4 << 20
    small = resolve_dataset(docs[:50])
    assert isinstance(small.value, list), "a small list is sent as it is"
    expected = [block for block, _ in document_blocks(resolve_dataset(docs[:3072]), 256)]
    in_memory = datasets.Dataset.from_dict({"text": docs})
    for data in (docs, in_memory, in_memory.to_iterable_dataset()):
        stream = actvpipe.stream(model_dir, data, context_length=32)
        assert len(pickle.dumps(stream.spec)) < 64 << 10, "file references, not the data"
        got = document_blocks(stream.spec.dataset, 256)
        assert [next(got)[0] for _ in range(len(expected))] == expected
        with stream.buffer(2000).batch(100) as loader:  # start and close times: benchmarks.scale
            assert len(next(iter(loader))) == 100
    assert stream.spec.dataset.describe().startswith("<IterableDataset")
    assert (
        actvpipe.stream(model_dir, docs, context_length=32)
        .spec.dataset.describe()
        .startswith("<list of 12000 documents")
    )


SCRIPT_WITH_ITS_OWN_DATA = """
import sys
import datasets
import actvpipe

def documents():
    for i in range(50):
        yield {"text": f"document number {i}"}

data = datasets.IterableDataset.from_generator(documents)
try:
    actvpipe.stream(sys.argv[1], data, context_length=16)
except ValueError as error:
    print(error)
"""


def test_code_defined_in_the_users_script_is_refused_by_stream_with_the_fix(tmp_path, model_dir):
    """A generator function in the script run as ``python script.py`` cannot be imported by the
    generator process. Before, ``stream()`` accepted it and the generator failed later, with an
    AttributeError about ``__main__``."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_WITH_ITS_OWN_DATA)
    out = subprocess.run(
        [sys.executable, str(script), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "dataset: uses documents, defined in the script you run (__main__)" in out.stdout
    assert "move documents into a module of its own" in out.stdout
