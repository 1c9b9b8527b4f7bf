"""The generator's node graph: documents -> packed contexts -> captured rows, per a resume plan."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn
from torchdata.nodes import Prefetcher

from actvpipe.cache_restore import CachedThenComputed, split_plan
from actvpipe.capture import ActivationCapture, CaptureNode, MultiModelCapture
from actvpipe.generator_node import PlannedNode
from actvpipe.models import load_model, load_tokenizer
from actvpipe.placement import Placement
from actvpipe.records import RowBlock
from actvpipe.resume import PlannedContexts, ResumePlan, RowFilter
from actvpipe.text import DocumentBlocks, PackedContexts
from actvpipe.write_through import WriteThrough

if TYPE_CHECKING:
    from actvpipe.spec import GeneratorOptions, StreamSpec


def build_rows_graph(
    spec: StreamSpec,
    plan: ResumePlan,
    options: GeneratorOptions,
    fill: Callable[[], float] | None = None,
    report: Callable[[bool], None] | None = None,
) -> PlannedNode[RowBlock]:
    """Load model and tokenizer, then: this rank's documents -> packed contexts per the plan
    (tokenized in a background thread) -> captured rows (on the device ``Placement`` picks) -> plan
    filter -> the write-through cache file of ``options``, if any. A restore with that file reads the
    buffered rows it holds back from it, and computes only the rest (see ``cache_restore``)."""
    cached = None
    if options.write_hdf5 is not None:
        plan, cached = split_plan(options.write_hdf5, plan, spec.context_length, spec.first_pos)
    models = [load_model(source, spec.compute_dtype, "cpu") for source in spec.sources]
    together = models[0] if len(models) == 1 else nn.ModuleList(models)  # moved between devices as one
    placement = Placement(together, options.device, options.watermarks, fill, report)
    tokenizer = load_tokenizer(spec.tokenizer)
    documents = DocumentBlocks(spec.dataset, rank=spec.rank, world_size=spec.world_size)
    packer = PackedContexts(
        documents,
        tokenizer,
        spec.context_length,
        spec.generation_batch_size,
        spec.packing,
        spec.rank,
        spec.world_size,
    )
    contexts = Prefetcher(PlannedContexts(packer, plan), prefetch_factor=4)
    captures = [ActivationCapture(m, spec.layers, spec.first_pos, spec.capture, spec.modules) for m in models]
    capture = MultiModelCapture(captures) if spec.diffing else captures[0]
    rows = CaptureNode(contexts, capture, spec.dtype, placement, spec.exclude_tokens)
    rows = RowFilter(rows, plan)
    if options.write_hdf5 is None:
        return rows
    attrs = spec.file_attrs()
    rows = WriteThrough(
        rows, options.write_hdf5, spec.row_shape, spec.dtype, attrs, spec.context_length, spec.first_pos
    )
    return rows if cached is None else CachedThenComputed(cached, rows)
