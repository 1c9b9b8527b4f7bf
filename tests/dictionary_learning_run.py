"""dictionary_learning's ``trainSAE`` on ``activations``, in a process of its own: importing it imports
nnsight, which patches torch functions process-wide (Llamascopium's initializer then fails in the same
process). Prints JSON: each step's loss, the config, and a digest of the first batch trainSAE drew."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import ClassVar

from dictionary_learning.trainers import StandardTrainer
from dictionary_learning.training import trainSAE

import actvpipe
from actvpipe.integrations.dictionary_learning import activations

model_dir, pair, steps = sys.argv[1], sys.argv[2] == "pair", int(sys.argv[3])
HOOKS = ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out")


class RecordingTrainer(StandardTrainer):
    """``StandardTrainer`` keeping each step's loss (trainSAE returns none)."""

    losses: ClassVar[list[float]] = []

    def loss(self, x, step, logging=False, **kwargs):
        out = super().loss(x, step=step, logging=logging, **kwargs)
        if not logging:
            RecordingTrainer.losses.append(out.item())
        return out


stream = actvpipe.stream(
    model_dir, actvpipe.demo.corpus_texts()[:30], context_length=64, capture=list(HOOKS), deterministic=True
)
loader = stream.buffer(4096).batch(256)
data = activations(loader, pair=HOOKS) if pair else activations(loader, HOOKS[1])
first = []


class Watched:
    """``data``, noting the first batch trainSAE draws (before it divides it by the norm factor)."""

    config = data.config

    def __iter__(self):
        for batch in data:
            if not first:
                first.append(hashlib.sha256(batch.numpy().tobytes()).hexdigest())
            yield batch


config = {
    "trainer": RecordingTrainer,
    "activation_dim": 64,
    "dict_size": 256,
    "lr": 1e-3,
    "l1_penalty": 1e-2,
    "warmup_steps": 5,
    "sparsity_warmup_steps": 10,
    "steps": steps,
    "layer": 1,
    "lm_name": "actvpipe-demo",
    "device": "cpu",
    "seed": 0,
}
with loader:
    trainSAE(Watched(), [config], steps=steps, device="cpu", normalize_activations=not pair)
print(json.dumps({"losses": RecordingTrainer.losses, "config": data.config, "first": first[0]}))
