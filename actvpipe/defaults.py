"""Each option's default is declared once, in the signature of the API function that takes it; the
config wrapper and the command line read it from there."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def default_of(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s argument ``name``."""
    default = inspect.signature(function).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{function.__qualname__}: {name} has no default")
    return default
