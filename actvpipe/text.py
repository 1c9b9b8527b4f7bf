"""Documents to packed token contexts: the pure packing function and the two nodes around it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from actvpipe.documents import DatasetSource, document_blocks


def pack_contexts(
    docs: Sequence[Sequence[int]], carry: np.ndarray, context_length: int, bos_id: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pack tokenized documents into contexts as the design notes define.

    Each document is followed by EOS and appended to ``carry`` (tokens left over from earlier
    documents); the stream is cut into chunks of ``context_length - 1`` tokens and BOS is prepended
    to each. Returns the ``[n, context_length]`` contexts and the new carry (the partial chunk).
    """
    pieces = [carry]
    eos = np.array([eos_id], dtype=np.int64)
    for doc in docs:
        pieces.append(np.asarray(doc, dtype=np.int64))
        pieces.append(eos)
    flat = np.concatenate(pieces)
    body = context_length - 1
    n = len(flat) // body
    contexts = np.empty((n, context_length), dtype=np.int64)
    contexts[:, 0] = bos_id
    contexts[:, 1:] = flat[: n * body].reshape(n, body)
    return contexts, flat[n * body :].copy()


@dataclass
class ContextBlock:
    """Consecutive packed contexts: ``tokens[j]`` is global context number ``first_seq + j``."""

    tokens: np.ndarray
    first_seq: int


class DocumentBlocks(BaseNode[list]):
    """Reads the dataset's text column in blocks of documents; state is the number of documents read."""

    def __init__(self, source: DatasetSource, block_docs: int = 256):
        super().__init__()
        self.source = source
        self.block_docs = block_docs
        self._docs_read = 0
        self._it = None

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        self._docs_read = initial_state["docs_read"] if initial_state else 0
        self._it = document_blocks(self.source, self.block_docs, start=self._docs_read)

    def next(self) -> list:
        block = next(self._it)
        self._docs_read += len(block)
        return block

    def get_state(self) -> dict[str, Any]:
        return {"docs_read": self._docs_read}


class PackedContexts(BaseNode[ContextBlock]):
    """Tokenizes document blocks and packs them into blocks of ``contexts_per_block`` contexts.

    The last block of a finite pass may be shorter; the final partial context is dropped.
    """

    def __init__(
        self, documents: BaseNode[list], tokenizer: Any, context_length: int, contexts_per_block: int
    ):
        super().__init__()
        self.documents = documents
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.contexts_per_block = contexts_per_block
        self.bos_id, self.eos_id = special_token_ids(tokenizer)

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or {}
        self.documents.reset(state.get("documents"))
        self._carry = np.asarray(state.get("carry", []), dtype=np.int64)
        self._pending = np.asarray(state.get("pending", []), dtype=np.int64).reshape(-1, self.context_length)
        self._next_seq = state.get("next_seq", 0)

    def next(self) -> ContextBlock:
        while len(self._pending) < self.contexts_per_block:
            try:
                docs = next(self.documents)
            except StopIteration:
                if len(self._pending) == 0:
                    raise
                break
            ids = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
            contexts, self._carry = pack_contexts(
                ids, self._carry, self.context_length, self.bos_id, self.eos_id
            )
            self._pending = np.concatenate([self._pending, contexts])
        tokens, self._pending = (
            self._pending[: self.contexts_per_block],
            self._pending[self.contexts_per_block :],
        )
        block = ContextBlock(tokens=tokens, first_seq=self._next_seq)
        self._next_seq += len(tokens)
        return block

    def get_state(self) -> dict[str, Any]:
        return {
            "documents": self.documents.state_dict(),
            "carry": self._carry.tolist(),
            "pending": self._pending.tolist(),
            "next_seq": self._next_seq,
        }


def special_token_ids(tokenizer: Any) -> tuple[int, int]:
    """(BOS, EOS) ids for packing: BOS falls back to EOS when the tokenizer has none."""
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    if eos is None:
        raise ValueError(
            "tokenizer: it defines no eos_token, which packing needs to separate documents; "
            "set tokenizer.eos_token (and bos_token) before passing it"
        )
    return bos, eos
