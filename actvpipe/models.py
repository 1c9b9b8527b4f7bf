"""Which model and tokenizer: resolve the user's arguments, read their config, load them (IO only).

transformers is imported where a model or tokenizer is loaded, never by a process that only
describes or serves a stream."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from actvpipe.capture import ActivationCapture
from actvpipe.checks import pickle_for_generator
from actvpipe.fingerprint import model_files_digest, parameters_digest

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

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
    tokenizer_content: str = ""  # see ``tokenizer_digest``

    @property
    def name(self) -> str:
        if isinstance(self.ref, str):
            return self.ref
        return getattr(self.ref.config, "_name_or_path", "") or type(self.ref).__name__

    def describe(self) -> str:
        return self.name


def resolve_model(model: Any, tokenizer: Any = None) -> tuple[ModelSource, PretrainedConfig]:
    """Check the model and tokenizer exist and load only their configs (cheap), before any work."""
    from transformers import PreTrainedModel

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
    else:
        pickle_for_generator(tokenizer, "tokenizer")
    vocabulary = tokenizer_digest(load_tokenizer(tokenizer))
    if not isinstance(ref, str):
        pickle_for_generator(type(ref), "model")
    config_hash = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    content = _content(ref, config_hash, hub_revision(ref) if isinstance(ref, str) else None)
    return ModelSource(ref, tokenizer, config_hash, content, vocabulary), config


def resolve_models(model: Any, tokenizer: Any = None) -> tuple[ModelSource | tuple[ModelSource, ...], list]:
    """One model, or a list of models streamed side by side (each row holds every model's
    activations at the same token): resolved each, and checked to share one tokenizer unless
    ``tokenizer=`` names the one to use for all. Returns the source (a tuple for a list) and configs."""
    if not isinstance(model, (list, tuple)):
        source, config = resolve_model(model, tokenizer)
        return source, [config]
    if not model:
        raise ValueError("model: an empty list; pass one model, or a list of two or more to diff")
    sources, configs = zip(*(resolve_model(m, tokenizer) for m in model), strict=True)
    if tokenizer is None:
        check_same_tokenizer(sources)
    return tuple(sources), list(configs)


def check_same_tokenizer(sources: Sequence[ModelSource]) -> None:
    """Models streamed together read the same token ids: same vocabulary, same special tokens."""
    first = load_tokenizer(sources[0].tokenizer)
    for source in sources[1:]:
        other = load_tokenizer(source.tokenizer)
        if first.get_vocab() != other.get_vocab():
            a, b = len(first.get_vocab()), len(other.get_vocab())
            problem = f"their vocabularies differ ({a:,} vs {b:,} tokens)"
        elif _special_tokens(first) != _special_tokens(other):
            problem = f"their special tokens differ ({_special_tokens(first)} vs {_special_tokens(other)})"
        else:
            continue
        raise ValueError(
            f"model: {sources[0].name!r} and {source.name!r} have different tokenizers: {problem}; pass "
            "tokenizer= to tokenize for all of them, if one vocabulary really fits both"
        )


def _special_tokens(tokenizer: Any) -> dict[str, int | None]:
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return {name: getattr(tokenizer, name, None) for name in names}


def common_dims(
    sources: Sequence[ModelSource], configs: Sequence[PretrainedConfig], layers: Sequence[int] | None
) -> tuple[int, int, int | None]:
    """(layers every model has, d_model, shortest maximum context) of models streamed together; a
    d_model that differs, or layer counts that differ without ``layers=``, is an error naming both."""
    dims = [model_dims(config) for config in configs]
    for source, (n_layers, d_model, _) in zip(sources[1:], dims[1:], strict=True):
        if d_model != dims[0][1]:
            raise ValueError(
                f"model: {sources[0].name!r} has d_model {dims[0][1]} but {source.name!r} has {d_model}; "
                "models streamed together need the same width"
            )
        if n_layers != dims[0][0] and layers is None:
            common = min(n_layers, dims[0][0])
            raise ValueError(
                f"model: {sources[0].name!r} has {dims[0][0]} layers but {source.name!r} has {n_layers}; "
                f"pass layers= with layers all of them have, e.g. layers=range({common})"
            )
    lengths = [m for _, _, m in dims if m is not None]
    return min(n for n, _, _ in dims), dims[0][1], min(lengths) if lengths else None


def _content(ref: str | PreTrainedModel, config_hash: str, revision: str | None) -> dict[str, str] | str:
    """What identifies the weights: a directory's config and weight files, a loaded model's
    parameters, a hub model's config and the hub revision (commit) it resolved to."""
    if not isinstance(ref, str):  # a loaded model
        return parameters_digest(ref)
    if Path(ref).expanduser().is_dir():
        return model_files_digest(Path(ref).expanduser())
    return config_hash if revision is None else f"{config_hash}@{revision}"


def hub_revision(ref: str) -> str | None:
    """The commit a hub id resolved to (its config was just read, so it is in the local hub cache),
    or None for a local directory."""
    if Path(ref).expanduser().exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(ref, "config.json")
    return Path(path).parent.name if isinstance(path, str) else None


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what the tokenizer maps text to: its vocabulary and its special tokens' ids."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(_special_tokens(tokenizer)).encode())
    digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()


def _load_config(ref: str) -> PretrainedConfig:
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(
            f"model: directory {ref!r} is not a saved model (no config.json); "
            "write one with model.save_pretrained(directory)"
        )
    if not path.exists() and (ref.startswith((".", "/", "~")) or ref.count("/") > 1):
        raise FileNotFoundError(f"model: no such directory {ref!r}; check the path")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref)
    except Exception as exc:
        if path.exists():
            raise ValueError(f"model: could not read the config in {ref!r} ({exc})") from exc
        raise ValueError(
            f"model: could not load {ref!r} from the Hugging Face hub ({type(exc).__name__}). {OFFLINE_HINT}"
        ) from exc


def quiet_transformers() -> None:
    """No progress bars or warnings from transformers in a process that loads models for us."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(ref: Any) -> Any:
    """Load a tokenizer by hub id or directory; a tokenizer object is returned as is."""
    if not isinstance(ref, str):
        return ref
    from transformers import AutoTokenizer

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
    from transformers import AutoModel

    if not isinstance(source.ref, str):  # a loaded model
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
    from transformers import AutoModel

    if not isinstance(source.ref, str):  # a loaded model
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
