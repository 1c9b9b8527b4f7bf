"""``Feed``, the seam every trainer integration shares: endless pass after pass, each pass whole, and
a state saved at any batch (the last of a pass included) resumes with the batch that came next."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch

import actvpipe
from actvpipe.integrations.feed import Feed

CTX = 32


def loader_of(model_dir, texts):
    stream = actvpipe.stream(model_dir, texts[:2], context_length=CTX, deterministic=True)
    return stream.buffer(300).batch(64, with_tokens=True)


def keys(batch) -> list[tuple[int, int]]:
    return list(zip(batch.seq.tolist(), batch.pos.tolist(), strict=True))


@pytest.fixture(scope="module")
def one_pass(model_dir, texts):
    with loader_of(model_dir, texts) as loader:
        return list(loader)


@pytest.mark.parametrize("saved_after", ["mid-pass", "end of pass"])
def test_feed_runs_pass_after_pass_and_resumes_after_any_batch(model_dir, texts, one_pass, saved_after):
    n = len(one_pass)
    assert n >= 3
    feed = Feed(loader_of(model_dir, texts), lambda batch: batch)
    with feed.loader:
        batches = [next(feed) for _ in range(2 * n + 2)]
    # Each pass serves every row once, and the first pass is the loader's own.
    whole = Counter(k for b in one_pass for k in keys(b))
    assert set(whole.values()) == {1}
    for p in range(2):
        assert Counter(k for b in batches[p * n : (p + 1) * n] for k in keys(b)) == whole
    assert all(torch.equal(a.acts, b.acts) for a, b in zip(batches[:n], one_pass, strict=True))

    at = n // 2 if saved_after == "mid-pass" else n
    first = Feed(loader_of(model_dir, texts), lambda batch: batch)
    with first.loader:
        for _ in range(at):
            next(first)
        state = pickle.loads(pickle.dumps(first.state_dict()))
    second = Feed(loader_of(model_dir, texts), lambda batch: batch)
    second.load_state_dict(state)
    with second.loader:
        rest = [next(second) for _ in range(n)]
    for got, expected in zip(rest, batches[at : at + n], strict=True):
        assert keys(got) == keys(expected) and torch.equal(got.acts, expected.acts)
