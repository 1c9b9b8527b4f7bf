"""Token filters, packing alternatives and pretokenized datasets, checked against direct computation."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import reference_pass, reference_rows, resumed_run
from transformers import AutoTokenizer

import actvpipe

CTX = 32


def served(stream, size=20_000) -> actvpipe.TokenBatch:
    with stream.buffer(size).batch(size, with_tokens=True) as loader:
        batches = list(loader)
    return merge(batches)


def merge(batches) -> actvpipe.TokenBatch:
    cat = {
        k: torch.cat([getattr(b, k) for b in batches]) for k in ("acts", "token_ids", "seq", "pos", "source")
    }
    order = torch.argsort(cat["seq"] * CTX + cat["pos"])
    return actvpipe.TokenBatch(**{k: v[order] for k, v in cat.items()})


def test_exclude_tokens_drops_exactly_those_rows(model_dir, texts):
    docs = texts[:4]
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    contexts, rows = reference_pass(model_dir, docs, CTX)
    tokens, rows = contexts[:, 1:].reshape(-1), rows[:, 1:].reshape(-1, 2, 4, 64)
    keep = tokens != eos
    assert (~keep).sum() >= 3, "the pass holds EOS tokens to drop"
    got = served(actvpipe.stream(model_dir, docs, context_length=CTX, exclude_tokens=[eos]))
    assert torch.equal(got.token_ids, tokens[keep])
    torch.testing.assert_close(got.acts, rows[keep], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exclude_tokens"):
        actvpipe.stream(model_dir, docs, context_length=CTX, exclude_tokens=[10**9])


def test_truncate_packing_is_one_document_per_context(model_dir, texts):
    docs = [texts[0][:200], texts[1], texts[2][:40]]
    tok = AutoTokenizer.from_pretrained(model_dir)
    contexts, lengths = [], []
    for doc in docs:
        ids = [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id][:CTX]
        lengths.append(len(ids))
        contexts.append(torch.tensor(ids))
    assert min(lengths) < CTX == max(lengths), "one short document, one cut"
    expected = torch.cat([reference_rows(model_dir, c[None])[0, 1:] for c in contexts])
    got = served(actvpipe.stream(model_dir, docs, context_length=CTX, packing="truncate"))
    assert torch.equal(got.seq, torch.cat([torch.full((n - 1,), j) for j, n in enumerate(lengths)]))
    assert torch.equal(got.token_ids, torch.cat([c[1:] for c in contexts]))
    torch.testing.assert_close(got.acts, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="packing"):
        actvpipe.stream(model_dir, docs, context_length=CTX, packing="pad")


def test_pretokenized_dataset_skips_tokenization(model_dir, texts):
    """Random token ids are no tokenizer's output: decoding and tokenizing them again gives other
    ids. The rows served hold exactly the given ids, packed as text would be, and the model's
    activations over them. (Before, the test fed the tokenizer's own ids, which a pipeline that
    decoded and re-tokenized would also have served.)"""
    tok = AutoTokenizer.from_pretrained(model_dir)
    rng = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, len(tok), (90,), generator=rng).tolist() for _ in range(3)]
    assert all(tok(tok.decode(d), add_special_tokens=False)["input_ids"] != d for d in ids)
    tokens = actvpipe.stream(model_dir, datasets.Dataset.from_dict({"tokens": ids}), context_length=CTX)
    assert tokens.spec.dataset.text_column == "tokens"
    stream = actvpipe.stream(model_dir, datasets.Dataset.from_dict({"input_ids": ids}), context_length=CTX)
    assert stream.spec.dataset.text_column == "input_ids"
    got = served(stream)
    packed = torch.tensor([t for d in ids for t in (*d, tok.eos_token_id)])
    n = len(packed) // (CTX - 1)
    assert torch.equal(got.token_ids, packed[: n * (CTX - 1)])
    contexts = torch.cat([torch.full((n, 1), tok.bos_token_id), packed[: n * (CTX - 1)].view(n, CTX - 1)], 1)
    torch.testing.assert_close(got.acts, reference_rows(model_dir, contexts)[:, 1:].reshape(got.acts.shape))


def test_resume_with_filtered_rows_is_exact(model_dir, texts):
    """Filtered rows leave gaps in the row ids; the frontier must follow ids, not counts."""
    docs = texts[:6]
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id

    def loader():
        stream = actvpipe.stream(
            model_dir, docs, context_length=CTX, exclude_tokens=[eos], packing="truncate"
        )
        return stream.buffer(300).batch(50, with_tokens=True)

    batches, _ = resumed_run(loader, 3)
    with loader() as whole:
        everything = merge(list(whole))
    resumed = merge(batches)
    assert torch.equal(resumed.seq * CTX + resumed.pos, everything.seq * CTX + everything.pos)
    assert torch.equal(resumed.acts, everything.acts)
    assert not (everything.token_ids == eos).any()
