"""Batches handed over on an accelerator: host rows copied on a side stream, without a host sync."""

from __future__ import annotations

import torch

from actvpipe.batches import Batch, TokenBatch


def batch_device(device: str | torch.device | None) -> torch.device | None:
    """Check ``.batch(device=...)`` before any work starts: None, "cpu", "cuda" or "cuda:N"."""
    if device is None:
        return None
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device: {device!r} is not a device ({exc}); pass 'cuda', 'cuda:N' or 'cpu'"
        ) from None
    if out.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} asked for, but CUDA is not available here; "
                "pass device='cpu' (or leave it out) to get host tensors"
            )
        if out.index is not None and out.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "pass an index below that"
            )
    elif out.type != "cpu":
        raise ValueError(f"device: {device!r} is not supported; pass 'cuda', 'cuda:N' or 'cpu'")
    return out


class DeviceCopy:
    """The hand-over of batches (a ``torchdata.nodes.Mapper``'s function): copies each batch to
    ``device`` on a side stream: the copy overlaps the training step the
    consumer queued before asking for the batch, the consumer's stream waits for it on the device
    (the host never blocks), and the caching allocators hold both sides' memory until the streams
    using it are done (the pinned host block until its copy ends, the device tensor until the
    consumer's work on it ends). On the CPU the same steps hand the batch over as it is."""

    def __init__(self, device: torch.device):
        self.device = device
        self.accelerated = device.type != "cpu"
        self._side: torch.Stream | None = None

    def __call__(self, batch: Batch) -> Batch:
        return batch.map(self.to_device) if isinstance(batch, TokenBatch) else self.to_device(batch)

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        module = torch.get_device_module(self.device)  # torch.cpu's streams run the same steps as no-ops
        if self._side is None:
            self._side = module.Stream(self.device)
        consumer = module.current_stream(self.device)
        with module.stream(self._side):
            out = host.to(self.device, non_blocking=True)
        consumer.wait_stream(self._side)
        if out is not host:
            out.record_stream(consumer)
        return out
