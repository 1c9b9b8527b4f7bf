"""Where the generator runs the model: a fixed device, or ``"auto"``, switching on buffer fill.

``next_on_gpu`` is the whole policy, a pure function with hysteresis: the GPU while the buffer is
below the low watermark, the CPU once it is above the high one, else stay. ``Placement`` applies
it to the one model copy, moving it between devices (see README, "Devices").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

DEFAULT_WATERMARKS = (0.25, 0.75)
log = logging.getLogger("actvpipe")


def check_watermarks(watermarks: tuple[float, float]) -> tuple[float, float]:
    """Validate ``(low, high)`` fill fractions with ``0 <= low < high <= 1``."""
    try:
        low, high = (float(w) for w in watermarks)
    except (TypeError, ValueError):
        raise ValueError(f"watermarks: expected two fractions (low, high), got {watermarks!r}") from None
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"watermarks: need 0 <= low < high <= 1, got ({low}, {high}); e.g. (0.25, 0.75)")
    return low, high


def next_on_gpu(fill: float, on_gpu: bool, low: float, high: float) -> bool:
    """The device after observing ``fill`` (fraction of the buffer holding rows) while on ``on_gpu``."""
    if fill < low:
        return True
    if fill > high:
        return False
    return on_gpu


def replay(fills: Iterable[float], low: float, high: float, on_gpu: bool = True) -> list[bool]:
    """The device after each fill of a history, starting on ``on_gpu`` (the policy over time)."""
    out = []
    for fill in fills:
        on_gpu = next_on_gpu(fill, on_gpu, low, high)
        out.append(on_gpu)
    return out


class Placement:
    """The model's device: fixed, or adaptive between ``gpu`` and ``"cpu"`` per ``next_on_gpu``.

    ``fill`` reads the buffer's fill fraction; ``report`` is told the device after every update.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str,
        watermarks: tuple[float, float] = DEFAULT_WATERMARKS,
        fill: Callable[[], float] | None = None,
        report: Callable[[bool], None] | None = None,
        gpu: str = "cuda",
    ):
        self.model = model
        self.adaptive = device == "auto"
        self.gpu = gpu
        self.low, self.high = watermarks
        self.fill = fill or (lambda: 0.0)
        self.report = report or (lambda on_gpu: None)
        self.on_gpu = self.adaptive or device.startswith("cuda")
        self.device = torch.device(self.gpu if self.adaptive else device)
        self.model.to(self.device)
        self.report(self.on_gpu)

    def update(self) -> torch.device:
        """Apply the policy to the current fill; returns the device to run the next block on."""
        if self.adaptive:
            fill = self.fill()
            on_gpu = next_on_gpu(fill, self.on_gpu, self.low, self.high)
            if on_gpu != self.on_gpu:
                self.on_gpu, self.device = on_gpu, torch.device(self.gpu if on_gpu else "cpu")
                self.model.to(self.device)
                if not on_gpu and torch.cuda.is_available():
                    torch.cuda.empty_cache()  # hand the weights' GPU memory back to training
                where = "GPU" if on_gpu else "CPU"
                log.info(
                    "actvpipe: generator moved to the %s, %s (buffer %.0f%% full)",
                    where,
                    self.device,
                    100 * fill,
                )
            self.report(self.on_gpu)
        return self.device
