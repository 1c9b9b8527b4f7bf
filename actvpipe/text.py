"""Documents to packed token contexts: the pure packing function and the two nodes around it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
from torchdata.nodes import BaseNode

from actvpipe.documents import DatasetSource, document_blocks
from actvpipe.records import ContextBlock


def pack_contexts(
    docs: Sequence[Sequence[int]],
    records: Sequence[int],
    carry: np.ndarray,
    carry_start: tuple[int, int],
    context_length: int,
    bos_id: int,
    eos_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack tokenized documents into contexts as the design notes define.

    Each document is followed by EOS and appended to ``carry`` (tokens left over from earlier
    documents, starting at ``carry_start``); the stream is cut into chunks of ``context_length - 1``
    tokens and BOS is prepended to each. A start point ``(record, offset)`` names the token at
    ``offset`` in document ``record``'s tokens plus EOS. Returns the ``[n, context_length]``
    contexts, the ``[n + 1, 2]`` start points of each context and of the new carry, and the carry.
    """
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    if all(isinstance(doc, np.ndarray) for doc in docs):
        tokens = np.concatenate([np.zeros(0, dtype=np.int64), *docs]).astype(np.int64, copy=False)
    else:
        tokens = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
    flat = np.concatenate([carry, np.insert(tokens, np.cumsum(lengths), eos_id)])
    body = context_length - 1
    n = len(flat) // body
    contexts = np.empty((n, context_length), dtype=np.int64)
    contexts[:, 0] = bos_id
    contexts[:, 1:] = flat[: n * body].reshape(n, body)
    seg_begin = np.concatenate([[0, len(carry)], len(carry) + np.cumsum(lengths + 1)])[:-1]
    seg_record = np.array([carry_start[0], *records], dtype=np.int64)
    seg_offset = np.zeros(len(seg_begin), dtype=np.int64)
    seg_offset[0] = carry_start[1]
    at = np.arange(n + 1, dtype=np.int64) * body
    seg = np.searchsorted(seg_begin, at, side="right") - 1
    starts = np.stack([seg_record[seg], seg_offset[seg] + at - seg_begin[seg]], axis=1)
    return contexts, starts, flat[n * body :].copy()


def truncate_contexts(
    docs: Sequence[Sequence[int]], context_length: int, bos_id: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """One context per document: BOS, the document and EOS, cut to ``context_length``, padded with
    EOS. Returns the ``[n, context_length]`` contexts and each one's length before padding."""
    contexts = np.full((len(docs), context_length), eos_id, dtype=np.int64)
    contexts[:, 0] = bos_id
    lengths = np.zeros(len(docs), dtype=np.int64)
    for j, doc in enumerate(docs):
        body = np.asarray(doc, dtype=np.int64)[: context_length - 1]
        contexts[j, 1 : 1 + len(body)] = body
        lengths[j] = min(len(body) + 2, context_length)  # the EOS after the document counts
    return contexts, lengths


PACKINGS = ("concat", "truncate")
PACKING_DESCRIPTIONS = {
    "concat": "concat: documents + EOS, chunks of context_length - 1, BOS prepended",
    "truncate": "truncate: one document per context: BOS + document + EOS, cut to context_length",
}


class DocumentBlocks(BaseNode[list]):
    """Reads this rank's documents in blocks of ``(record, text)``; state is the next record.

    The documents read since the last reset (up to ``tape_docs`` of them) stay on a tape, so a reset
    to the same or a later record replays them and reads on from the open dataset (documents in
    between are read, never tokenized): a restore that re-packs many blocks scans the data once.
    Only a reset to a record before the tape reopens the dataset.
    """

    def __init__(
        self,
        source: DatasetSource,
        block_docs: int = 256,
        tape_docs: int = 4096,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.source = source
        self.block_docs = block_docs
        self.tape_docs = tape_docs
        self.rank, self.world_size = rank, world_size
        self.documents_read = 0  # a count for benchmarks and tests, not state
        self._it: Iterator[tuple[list, int]] | None = None
        self._tape: list[tuple[int, Any]] = []  # documents read from the dataset, oldest first
        self._tape_from = 0  # the tape holds every document from this record to ``_read_to``
        self._cursor = 0  # tape[_cursor:] is read but not yet returned
        self._read_to = 0  # records below this have been read from the dataset
        self._record = 0  # the next block holds documents from this record on

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        record = initial_state["record"] if initial_state else 0
        if self._it is None or record < self._tape_from:
            self._it = document_blocks(
                self.source, self.block_docs, start=record, rank=self.rank, world_size=self.world_size
            )
            self._tape, self._read_to = [], record
        else:
            self._tape = [doc for doc in self._tape if doc[0] >= record]
            while not self._tape and self._read_to < record:
                try:
                    block, self._read_to = next(self._it)
                except StopIteration:
                    break
                self.documents_read += len(block)
                self._tape = [doc for doc in block if doc[0] >= record]
        self._tape_from, self._cursor, self._record = record, 0, record

    def next(self) -> list[tuple[int, Any]]:
        if self._cursor == len(self._tape):
            block, self._read_to = next(self._it)
            self.documents_read += len(block)
            self._tape += block
            drop = len(self._tape) - self.tape_docs - len(block)
            if drop > 0:
                self._tape, self._cursor = self._tape[drop:], self._cursor - drop
                self._tape_from = self._tape[0][0]
        block, self._cursor = self._tape[self._cursor :], len(self._tape)
        self._record = self._read_to
        return block

    def get_state(self) -> dict[str, Any]:
        return {"record": self._record}


@dataclass(frozen=True)
class RankNumbering:
    """Global context numbers for one rank's contexts: its ``b``-th block of ``block`` contexts is
    global block ``b * world_size + rank``, so ranks' row ids never collide and one rank's are the
    single-process numbering."""

    rank: int = 0
    world_size: int = 1
    block: int = 1

    def to_global(self, local: int) -> int:
        b, j = divmod(local, self.block)
        return (b * self.world_size + self.rank) * self.block + j

    def to_local(self, seq: int) -> int:
        b, j = divmod(seq, self.block)
        return b // self.world_size * self.block + j


class PackedContexts(BaseNode[ContextBlock]):
    """Tokenizes document blocks and packs them into blocks of ``contexts_per_block`` contexts.

    The last block of a finite pass may be shorter; the final partial context is dropped. The state
    is a start point and a (global, see ``RankNumbering``) context number: resuming re-reads from
    that document, never the model.
    """

    def __init__(
        self,
        documents: BaseNode[list],
        tokenizer: Any,
        context_length: int,
        contexts_per_block: int,
        packing: str = "concat",
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__()
        self.documents = documents
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.contexts_per_block = contexts_per_block
        self.packing = packing
        self.numbering = RankNumbering(rank, world_size, contexts_per_block)
        self.bos_id, self.eos_id = special_token_ids(tokenizer)
        self.encode = batch_encoder(tokenizer)
        self.documents_tokenized = 0  # a count for benchmarks and tests, not state

    def reset(self, initial_state: dict | None = None) -> None:
        super().reset(initial_state)
        state = initial_state or {"record": 0, "offset": 0, "next_seq": 0}
        self.documents.reset({"record": state["record"]})
        self._skip = (state["record"], state["offset"])
        self._carry = np.zeros(0, dtype=np.int64)
        self._carry_start = self._skip
        self._pending = np.zeros((0, self.context_length), dtype=np.int64)
        self._pending_starts = np.zeros((0, 2), dtype=np.int64)
        self._pending_lengths = np.zeros(0, dtype=np.int64)
        self._next_seq = self.numbering.to_local(state["next_seq"])

    def _read_documents(self) -> None:
        block = next(self.documents)
        records = [record for record, _ in block]
        ids = self._tokenize([doc for _, doc in block])
        if self.packing == "truncate":
            contexts, lengths = truncate_contexts(ids, self.context_length, self.bos_id, self.eos_id)
            self._carry_start = (self.documents.state_dict()["record"], 0)
            starts = np.array([(r, 0) for r in records], dtype=np.int64).reshape(-1, 2)
            self._append(contexts, starts, lengths)
            return
        if records and self._skip is not None and records[0] == self._skip[0] and self._skip[1]:
            self._carry = np.array([*ids[0], self.eos_id], dtype=np.int64)[self._skip[1] :]
            records, ids = records[1:], ids[1:]
        self._skip = None
        contexts, starts, self._carry = pack_contexts(
            ids, records, self._carry, self._carry_start, self.context_length, self.bos_id, self.eos_id
        )
        self._carry_start = tuple(starts[-1])
        self._append(contexts, starts[:-1], np.full(len(contexts), self.context_length))

    def _tokenize(self, docs: list) -> list:
        """Token ids of each document; pretokenized documents (arrays of ids) pass through."""
        texts = [j for j, doc in enumerate(docs) if isinstance(doc, str)]
        self.documents_tokenized += len(texts)
        if len(texts) == len(docs):
            return self.encode(docs)
        ids = list(docs)
        if texts:
            for j, tokens in zip(texts, self.encode([docs[j] for j in texts]), strict=True):
                ids[j] = tokens
        return ids

    def _append(self, contexts: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        self._pending = np.concatenate([self._pending, contexts])
        self._pending_starts = np.concatenate([self._pending_starts, starts])
        self._pending_lengths = np.concatenate([self._pending_lengths, lengths])

    def _next_start(self) -> tuple[int, int]:
        return tuple(int(v) for v in (self._pending_starts[0] if len(self._pending) else self._carry_start))

    def next(self) -> ContextBlock:
        while len(self._pending) < self.contexts_per_block:
            try:
                self._read_documents()
            except StopIteration:
                if len(self._pending) == 0:
                    raise
                break
        start = self._next_start()
        k = self.contexts_per_block
        tokens, self._pending = self._pending[:k], self._pending[k:]
        lengths, self._pending_lengths = self._pending_lengths[:k], self._pending_lengths[k:]
        self._pending_starts = self._pending_starts[k:]
        block = ContextBlock(
            tokens=tokens,
            first_seq=self.numbering.to_global(self._next_seq),
            start=start,
            next_start=self._next_start(),
            next_seq=self.numbering.to_global(self._next_seq + len(tokens)),
            lengths=None if (lengths == self.context_length).all() else lengths,
        )
        self._next_seq += len(tokens)
        return block

    def get_state(self) -> dict[str, Any]:
        record, offset = self._next_start()
        return {"record": record, "offset": offset, "next_seq": self.numbering.to_global(self._next_seq)}


def batch_encoder(tokenizer: Any) -> Any:
    """``texts -> token ids`` as ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` gives
    them; for a fast tokenizer the Rust backend's batch call, which skips building offsets and
    attention masks (a fifth of the tokenizer's time on short documents)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]


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
