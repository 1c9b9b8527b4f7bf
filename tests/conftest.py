"""Shared fixtures: the tiny demo model (built once per session) and an independent reference capture."""

from __future__ import annotations

import os
import pickle

# Before anything imports huggingface_hub, which reads these once: a hub lookup fails at once
# instead of timing out on a machine without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["ACTVPIPE_CACHE"] = str(tmp_path_factory.mktemp("actvpipe-cache"))


@pytest.fixture(scope="session")
def model_dir(_isolated_cache) -> Path:
    from actvpipe.demo import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def texts() -> list[str]:
    from actvpipe.demo import corpus_texts

    return corpus_texts()[:30]


@pytest.fixture(autouse=True)
def no_leaked_shared_memory():
    """Every test must leave /dev/shm as it found it (blocks this process named; other test runs on
    the machine may come and go)."""
    mine = f"actvpipe_{os.getpid()}_"
    before = {n for n in os.listdir("/dev/shm") if n.startswith(mine)}
    yield
    import gc

    gc.collect()
    after = {n for n in os.listdir("/dev/shm") if n.startswith(mine)}
    assert after <= before, f"leaked shared memory: {sorted(after - before)}"


def resumed_run(make_loader, batches_before: int) -> tuple[list, dict]:
    """(batches, state) of a run saved after ``batches_before`` batches, its state pickled, and
    finished by a fresh loader restored from it."""
    with make_loader() as first:
        it = iter(first)
        head = [next(it) for _ in range(batches_before)]
        state = pickle.loads(pickle.dumps(first.state_dict()))
    rest = make_loader()
    rest.load_state_dict(state)
    with rest:
        pid = rest.generator_pid
        tail = list(rest)
        assert rest.generator_pid == pid, "start() launched the resumed pass; iterating kept it"
    return head + tail, state


def reference_contexts(model_dir: Path, texts: list[str], context_length: int) -> torch.Tensor:
    """The design notes' packing, written out plainly: docs + EOS, chunks of ctx-1, BOS prepended."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    flat: list[int] = []
    for text in texts:
        if text:
            flat += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = context_length - 1
    chunks = [[bos, *flat[i : i + body]] for i in range(0, len(flat) - body + 1, body)]
    return torch.tensor(chunks)


def reference_rows(model_dir: Path, contexts: torch.Tensor, layers=None) -> torch.Tensor:
    """Rows [n_ctx, ctx, 2, n_layers, d] from plain forward hooks on ln_2's input and the MLP's output."""
    model = AutoModel.from_pretrained(model_dir).eval()
    layers = list(range(model.config.n_layer)) if layers is None else list(layers)
    saved: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for j, i in enumerate(layers):
        block = model.h[i]
        handles.append(
            block.ln_2.register_forward_pre_hook(lambda m, a, j=j: saved.__setitem__((0, j), a[0]))
        )
        handles.append(block.mlp.register_forward_hook(lambda m, a, o, j=j: saved.__setitem__((1, j), o)))
    out = []
    with torch.no_grad():
        for ctx in contexts:
            model(ctx[None])
            out.append(
                torch.stack(
                    [torch.stack([saved[(s, j)][0] for j in range(len(layers))], 1) for s in (0, 1)], 1
                )
            )
    for h in handles:
        h.remove()
    return torch.stack(out)


def reference_pass(
    model_dir: Path, texts: list[str], context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts, rows [n_ctx, ctx, 2, n_layers, d]) of the documented pass over ``texts``."""
    contexts = reference_contexts(model_dir, texts, context_length)
    return contexts, reference_rows(model_dir, contexts)


def assert_exact_rows(seq, pos, acts, reference, context_length: int, rtol=1e-4, atol=1e-5) -> None:
    """The rows of one whole pass, each exactly once: the sorted (context, position) keys equal every
    position 1..context_length-1 of every reference context, and each row equals the reference's."""
    contexts, rows = reference
    keys = torch.sort(torch.as_tensor(seq) * context_length + torch.as_tensor(pos)).values
    every = torch.arange(len(contexts) * context_length).view(len(contexts), context_length)[:, 1:]
    assert torch.equal(keys, every.reshape(-1)), "lost or duplicated rows"
    torch.testing.assert_close(torch.as_tensor(acts), rows[seq, pos], rtol=rtol, atol=atol)


def assert_exact_batches(batches, reference, context_length: int, **tolerance) -> None:
    """``assert_exact_rows`` over ``TokenBatch`` records."""
    seq, pos, acts = (torch.cat([getattr(b, f) for b in batches]) for f in ("seq", "pos", "acts"))
    assert_exact_rows(seq, pos, acts, reference, context_length, **tolerance)


def read_line(stream, timeout: float = 120.0) -> str:
    """The next line a child process writes, failing the test (never hanging it) if none comes
    within ``timeout`` seconds."""
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        pytest.fail(f"no line from the child process within {timeout:g} s")
    return stream.readline()
