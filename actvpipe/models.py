"""Which model and tokenizer: resolve the user's arguments, read their config, load them (IO only)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel

from actvpipe.fingerprint import model_files_digest, parameters_digest

OFFLINE_HINT = (
    "Without network access use actvpipe.demo_stream() (a bundled tiny GPT-2-architecture model) "
    "or pass a local directory written by save_pretrained()"
)


@dataclass(frozen=True)
class ModelSource:
    """A picklable reference to the model: a hub id or directory, or a loaded model in shared memory."""

    ref: str | PreTrainedModel
    tokenizer: Any  # hub id or directory (loaded in the generator), or a tokenizer object
    config_hash: str = ""
    content: dict[str, str] | str = ""  # see ``fingerprint``: weight files, or the parameters' hash

    @property
    def name(self) -> str:
        if isinstance(self.ref, str):
            return self.ref
        return getattr(self.ref.config, "_name_or_path", "") or type(self.ref).__name__

    def describe(self) -> str:
        return self.name


def resolve_model(model: Any, tokenizer: Any = None) -> tuple[ModelSource, PretrainedConfig]:
    """Check the model and tokenizer exist and load only their configs (cheap), before any work."""
    if isinstance(model, PreTrainedModel):
        if tokenizer is None:
            name = getattr(model.config, "_name_or_path", "")
            if not name or not Path(name).is_dir():
                raise ValueError(
                    "tokenizer: required when model is a loaded PreTrainedModel; pass tokenizer="
                )
            tokenizer = name
        model.share_memory()
        config, ref = model.config, model
    elif isinstance(model, (str, os.PathLike)):
        ref = os.fspath(model)
        config = _load_config(ref)
        tokenizer = ref if tokenizer is None else tokenizer
    else:
        raise TypeError(
            f"model: expected a hub id, a local directory or a PreTrainedModel, got {type(model).__name__}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = os.fspath(tokenizer)
        load_tokenizer(tokenizer)
    config_hash = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return ModelSource(ref, tokenizer, config_hash, _content(ref, config_hash)), config


def _content(ref: str | PreTrainedModel, config_hash: str) -> dict[str, str] | str:
    """What identifies the weights: a directory's config and weight files, a loaded model's
    parameters, a hub model's config (its files are only known once downloaded)."""
    if isinstance(ref, PreTrainedModel):
        return parameters_digest(ref)
    if Path(ref).expanduser().is_dir():
        return model_files_digest(Path(ref).expanduser())
    return config_hash


def _load_config(ref: str) -> PretrainedConfig:
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"model: directory {ref!r} is not a saved model (no config.json); "
            "write one with model.save_pretrained(directory)"
        )
    if not path.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise FileNotFoundError(f"model: no such directory {ref!r}; check the path")
    try:
        return AutoConfig.from_pretrained(ref)
    except Exception as exc:
        if path.exists():
            raise ValueError(f"model: could not read the config in {ref!r} ({exc})") from exc
        raise ValueError(
            f"model: could not load {ref!r} from the Hugging Face hub ({type(exc).__name__}). {OFFLINE_HINT}"
        ) from exc


def load_tokenizer(ref: Any) -> Any:
    """Load a tokenizer by hub id or directory; a tokenizer object is returned as is."""
    if not isinstance(ref, str):
        return ref
    try:
        return AutoTokenizer.from_pretrained(ref)
    except Exception as exc:
        where = "directory" if Path(ref).exists() else "hub id"
        raise ValueError(
            f"tokenizer: could not load a tokenizer from {where} {ref!r} ({type(exc).__name__}); "
            f"pass tokenizer= naming one. {OFFLINE_HINT}"
        ) from exc


def load_model(source: ModelSource, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """Load the base model (no LM head) in ``dtype`` on ``device``, in evaluation mode."""
    if isinstance(source.ref, PreTrainedModel):
        model = source.ref.to(dtype=dtype)
    else:
        model = AutoModel.from_pretrained(source.ref, dtype=dtype)
    return model.to(device).eval()


def check_capture_modules(
    source: ModelSource,
    config: PretrainedConfig,
    layers: Sequence[int],
    capture: tuple[str, ...],
    modules: tuple[str, ...] | None,
) -> None:
    """Resolve every hooked module on a weightless (meta-device) copy of the model, so a wrong
    ``modules=`` template or an unknown architecture fails before any process starts."""
    from actvpipe.capture import ActivationCapture

    if isinstance(source.ref, PreTrainedModel):
        skeleton = source.ref
    else:
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    ActivationCapture(skeleton, layers, 0, capture, modules).remove()


def model_dims(config: PretrainedConfig) -> tuple[int, int, int | None]:
    """(number of layers, d_model, maximum context length or None) from a model config."""
    config = getattr(config, "text_config", None) or config
    max_len = getattr(config, "max_position_embeddings", None)
    return config.num_hidden_layers, config.hidden_size, max_len
