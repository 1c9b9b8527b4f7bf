"""The structure the code is held to: no import circle, a light serving path, one declaration per
default, one versioned state schema, one monitor per loader, and private APIs that fail loudly."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import multiprocessing.forkserver
import pickle
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import actvpipe
from actvpipe import cli, config
from actvpipe.defaults import default_of
from actvpipe.loader_state import STATE_VERSION, LoaderState
from actvpipe.stream import ActivationStream, BufferedStream

ROOT = Path(__file__).resolve().parents[1]
CTX = 32


def runtime_imports(path: Path) -> set[str]:
    """The actvpipe modules a module imports when it runs: at module level and inside functions,
    leaving out ``if TYPE_CHECKING:`` blocks (they never run)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "actvpipe":
            parts = node.module.split(".")
            out |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names} | {"__init__"}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("actvpipe.")}
    return out - {path.stem}


def test_no_module_imports_itself_through_others():
    """Depth-first search for a cycle in the graph of runtime imports between actvpipe's modules.
    Before the restructuring 14 modules formed one circle (spec -> __init__ -> config -> stream ->
    sampling -> cache -> spec, documents -> demo -> stream, ...), closed by function-level imports."""
    modules = {p.stem: p for p in (ROOT / "actvpipe").glob("*.py")}
    graph = {name: runtime_imports(path) & set(modules) for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycle = [*trail[trail.index(dep) :], dep] if dep in trail else [name, dep]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*trail, dep])
        state[name] = "closed"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


SERVE_FROM_FILES = """
import sys, actvpipe
with actvpipe.from_hdf5(sys.argv[1]).buffer(500).batch(100) as loader:
    rows = sum(len(b) for b in loader)
heavy = sorted(m for m in ("transformers", "datasets", "tokenizers") if m in sys.modules)
print(rows, heavy)
"""


def test_serving_from_files_never_imports_the_model_libraries(model_dir, texts, tmp_path):
    """A trainer that only reads caches loads no model code. Before, the serving path imported
    transformers (sampling -> cache -> spec -> models)."""
    path = actvpipe.stream(model_dir, texts[:3], context_length=CTX).to_hdf5(
        tmp_path / "c.h5", progress=False
    )
    out = subprocess.run(
        [sys.executable, "-c", SERVE_FROM_FILES, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rows, heavy = out.stdout.split(maxsplit=1)
    assert int(rows) == actvpipe.from_hdf5(path).spec.files[0].rows > 0
    assert heavy.strip() == "[]"


def test_the_command_line_and_the_config_wrapper_take_their_defaults_from_the_api():
    """Each default is declared once, in the API's signature; a copy elsewhere fails here (before:
    the CLI, ``DataLoaderConfig`` and ``.buffer()`` each restated theirs, and the config's
    ``refresh_interval`` was 0.1 against the API's 0.5)."""
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("cache", "stats"):
        parser = commands.choices[command]
        for name in ("text_column", "generation_batch_size", "device"):
            assert parser.get_default(name) == default_of(actvpipe.stream, name), (command, name)
    assert commands.choices["stats"].get_default("rows") == default_of(ActivationStream.stats, "rows")
    made = config.DataLoaderConfig()
    assert made.generation_batch_size == default_of(actvpipe.stream, "generation_batch_size")
    assert made.model_dtype == default_of(actvpipe.stream, "dtype")
    assert made.refresh_interval == default_of(ActivationStream.buffer, "refresh_interval")
    assert made.max_sequence_length == actvpipe.stream.__globals__["GPT2_DEFAULTS"]["context_length"]
    assert default_of(ActivationStream.stats, "rows") == default_of(ActivationStream.buffer, "stats_rows")


def readme_signatures() -> dict[str, ast.arguments]:
    """The signatures the README's API block states, parsed as Python."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## API") :].split("```python", 1)[1].split("```", 1)[0]
    out = {}
    for call in re.split(r"\n(?=\S)", block.strip()):
        name, rest = call.split("(", 1)
        params = rest.rsplit(") ->", 1)[0]
        tree = ast.parse(f"def f({params}): pass")
        out[name.strip()] = tree.body[0].args
    return out


def test_the_readme_states_the_signatures_the_code_has():
    """The README's API block lists every argument with the code's default, in the code's order."""
    functions = {
        "actvpipe.stream": actvpipe.stream,
        "ActivationStream.buffer": ActivationStream.buffer,
        "BufferedStream.batch": BufferedStream.batch,
        "ActivationStream.to_hdf5": ActivationStream.to_hdf5,
        "ActivationStream.stats": ActivationStream.stats,
        "actvpipe.from_hdf5": actvpipe.from_hdf5,
    }
    stated = readme_signatures()
    assert set(stated) == set(functions)
    for name, function in functions.items():
        params = [p for p in inspect.signature(function).parameters.values() if p.name != "self"]
        args = stated[name]
        written = [*args.args, *args.kwonlyargs]
        assert [a.arg for a in written] == [p.name for p in params], name
        defaults = dict(zip([a.arg for a in args.args][::-1], args.defaults[::-1], strict=False))
        defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d})
        for p in params:
            if p.default is inspect.Parameter.empty:
                assert p.name not in defaults, (name, p.name)
            else:
                assert ast.unparse(defaults[p.name]) == repr(p.default), (name, p.name)


def test_a_state_of_another_schema_version_is_refused_naming_both(model_dir, texts):
    """One versioned schema; before, a state without the current version was read field by field."""
    make = lambda: actvpipe.stream(model_dir, texts[:3], context_length=CTX).buffer(800).batch(100)  # noqa: E731
    with make() as loader:
        next(iter(loader))
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert state["version"] == STATE_VERSION and set(state) == {"version", "fingerprint", "nodes"}
    older = {**state, "version": STATE_VERSION - 1}
    with pytest.raises(ValueError, match=rf"version {STATE_VERSION - 1}\b.*version {STATE_VERSION}\b"):
        make().load_state_dict(older)
    before_the_schema = {"root": {"fingerprint": {"state_version": 4}}, "num_yielded": 1}
    with pytest.raises(ValueError, match=rf"version 4\b.*version {STATE_VERSION}\b"):
        make().load_state_dict(before_the_schema)
    saved = LoaderState.from_dict(state).buffer
    assert saved.batches == 1 and saved.pass_number == 1 and len(saved.frontiers) == 1


def event_steps(directory: Path) -> list[list[int]]:
    """Per TensorBoard event file under ``directory``: the steps of its ``loader/wait_s`` scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        out.append([e.step for e in events.Scalars("loader/wait_s")])
    return out


def test_two_loaders_of_one_buffered_stream_each_keep_their_own_monitor(model_dir, texts, tmp_path):
    """``.buffer()`` is a description: each loader opens its own TensorBoard writer when it starts.
    Before, ``.buffer()`` made one Monitor that both loaders shared: one event file whose batch
    counter mixed both loaders, closed by whichever closed first."""
    buffered = actvpipe.stream(model_dir, texts[:4], context_length=CTX).buffer(
        1000, log_dir=tmp_path, progress=False, refresh_interval=0
    )
    assert dataclasses.is_dataclass(buffered) and pickle.loads(pickle.dumps(buffered)) == buffered
    first, second = buffered.batch(100), buffered.batch(100)
    with first, second:
        a, b = iter(first), iter(second)
        for _ in range(3):
            next(a), next(b)
        first.close()
        for _ in range(3):
            next(b)
    steps = event_steps(tmp_path)
    assert len(steps) == 2, "one event file per loader"
    assert sorted(max(s) for s in steps) == [3, 6], "each counts its own batches"


def test_private_apis_we_depend_on_are_still_there():
    """Each private API is read in one place; if a release removes one, this fails loudly instead of
    the feature degrading silently."""
    from actvpipe.generator import forkserver_pid
    from actvpipe.hdf5_writer import Hdf5RowWriter
    from actvpipe.outputs import storage_users
    from actvpipe.records import RowBlock

    kept = torch.zeros(4)
    view = kept[1:]
    assert storage_users(kept) == storage_users(view) >= 2  # torch._C._storage_Use_Count
    assert hasattr(multiprocessing.forkserver._forkserver, "_forkserver_pid")
    assert forkserver_pid() is None or forkserver_pid() > 0
    # The H5Pset call that reopens a durable file whose writer died (clear_status_flags):
    path = Path(__import__("tempfile").mkdtemp()) / "d.h5"
    writer = Hdf5RowWriter(path, (1, 1, 2), torch.float32, {"layers": [0], "d_model": 2}, durable=True)
    meta = {k: np.arange(3) for k in ("row_id", "seq", "pos", "token_ids")}
    writer.write(RowBlock(torch.ones(3, 1, 1, 2), meta))
    writer.file.close()
    again = Hdf5RowWriter.continue_file(path)
    assert again.rows == 3
    again.finish()
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"] and f.attrs["row_count"] == 3
