"""The embedded default: a bundled corpus and a tiny GPT-2-architecture model built offline on first use.

The model and its byte-level BPE tokenizer are written with ``save_pretrained`` to a cache directory
and always loaded back with ``from_pretrained``, so the demo runs the same loading path as a hub model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch

from actvpipe.locations import cache_dir

DEMO_CONFIG = {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 256}
DEMO_VOCAB = 2048
DEMO_CONTEXT = 128
EOT = "<|endoftext|>"


def corpus_path() -> Path:
    """The bundled corpus: JSON lines with a ``text`` field (CPython docstrings, PSF licence)."""
    return Path(str(files("actvpipe") / "data" / "corpus.jsonl"))


def corpus_texts() -> list[str]:
    with open(corpus_path()) as f:
        return [json.loads(line)["text"] for line in f]


def demo_model_dir() -> Path:
    """Directory of the tiny demo model and tokenizer, built on first use (about a second)."""
    recipe = json.dumps([DEMO_CONFIG, DEMO_VOCAB, hashlib.sha256(corpus_path().read_bytes()).hexdigest()])
    target = cache_dir() / f"demo-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        build_demo_model(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_demo_model(out: Path) -> None:
    """Train the tokenizer on the corpus and write a deterministically initialised tiny GPT-2."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast
    from transformers.utils import logging as hf_logging

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus_texts(), vocab_size=DEMO_VOCAB, min_frequency=2, special_tokens=[EOT], show_progress=False
    )
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=DEMO_CONFIG["n_positions"],
    )
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eot, eos_token_id=eot, **DEMO_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out)
