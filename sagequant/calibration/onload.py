"""Weights that stay where they are until a block needs them: a checkpoint directory read lazily
(sharded safetensors through `safetensors.safe_open`, one tensor at a time) or a module's CPU
state, and an empty model to trace (parameters on the meta device, so tracing allocates no
weight memory anywhere; buffers computed at construction, e.g. rotary frequencies, stay real).

Graph attributes are named `model.<checkpoint key>` (ir/trace.WRAPPER_PREFIX); tied parameters
(a head sharing the embedding) appear once in the graph under either name, so every tied name
is looked up under all of its aliases.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from pathlib import Path

import torch

from ..errors import SageQuantError, UnsupportedError
from ..ir.trace import WRAPPER_PREFIX


class WeightSourceError(SageQuantError, ValueError):
    """A checkpoint directory cannot serve a tensor the graph reads."""


class CheckpointWeights:
    """Tensors of a safetensors checkpoint directory, opened lazily, read one at a time."""

    def __init__(self, directory: str | Path, aliases: dict[str, list[str]] | None = None):
        from safetensors import safe_open
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(self.directory.glob("*.safetensors"))
            if not shards:
                raise WeightSourceError(f"{str(self.directory)!r} has no *.safetensors files; "
                                        "layer-wise onloading reads safetensors checkpoints only")
            files = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    files.update({k: shard.name for k in f.keys()})
        self._file_of = files
        self._open = safe_open
        self._handles: dict[str, object] = {}
        self.aliases = aliases or {}

    def _key(self, name: str) -> str:
        for key in [name, *self.aliases.get(name, [])]:
            if key in self._file_of:
                return key
        raise WeightSourceError(f"tensor {name!r} is not in the checkpoint {str(self.directory)!r} "
                                f"(nor its tied aliases {self.aliases.get(name, [])})")

    def _handle(self, key: str):
        fname = self._file_of[key]
        if fname not in self._handles:
            self._handles[fname] = self._open(str(self.directory / fname), framework="pt")
        return self._handles[fname]

    def __contains__(self, name: str) -> bool:
        try:
            self._key(name)
            return True
        except WeightSourceError:
            return False

    def load(self, name: str) -> torch.Tensor:
        key = self._key(name)
        return self._handle(key).get_tensor(key)

    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in set(self._file_of.values()))


class StateWeights:
    """The same interface over an in-memory state dict (weights kept in CPU memory)."""

    def __init__(self, state: dict[str, torch.Tensor], aliases: dict[str, list[str]] | None = None):
        self.state = state
        self.aliases = aliases or {}

    def _key(self, name):
        for key in [name, *self.aliases.get(name, [])]:
            if key in self.state:
                return key
        raise WeightSourceError(f"tensor {name!r} is not in the model's state")

    def __contains__(self, name):
        return any(k in self.state for k in [name, *self.aliases.get(name, [])])

    def load(self, name: str) -> torch.Tensor:
        return self.state[self._key(name)]


def tied_aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """name -> the other names of the same parameter (tied embeddings)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names if len(names) > 1}


@contextlib.contextmanager
def _parameters_on_meta():
    """Every nn.Parameter registered inside is moved to the meta device as it is registered
    (its initialisation then runs on meta: no memory, no time); buffers stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"),
                                                          requires_grad=param.requires_grad)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def empty_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The causal LM of a checkpoint directory with no weights loaded (parameters on meta)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise WeightSourceError(f"{str(d)!r} has no config.json: not a transformers checkpoint directory")
    config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def graph_weight_names(graph, nodes) -> list[str]:
    """Attribute names (graph spelling) that `nodes` read through get_attr, in first-use order."""
    names: dict[str, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                names.setdefault(arg.target, None)
    return list(names)


def checkpoint_name(attr: str) -> str:
    return attr[len(WRAPPER_PREFIX):] if attr.startswith(WRAPPER_PREFIX) else attr


def onload(graph, names: list[str], source, device: torch.device, dtype: torch.dtype) -> int:
    """Replace the meta attributes among `names` by the source's tensors on `device`; returns the
    bytes brought over. Attributes already real (computed buffers, rewritten weights) only move."""
    moved = 0
    for name in names:
        current = graph.attr(name)
        if current.device.type == "meta":
            tensor = source.load(checkpoint_name(name))
            if tuple(tensor.shape) != tuple(current.shape):
                raise WeightSourceError(
                    f"checkpoint tensor {checkpoint_name(name)!r} has shape {tuple(tensor.shape)}, the "
                    f"graph reads {tuple(current.shape)} (a pass changed its layout before the weights "
                    "were loaded; layer-wise onloading supports models whose linears are nn.Linear)")
            tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        elif current.device != device:
            tensor = current.to(device)
        else:
            continue
        graph.set_attr(name, tensor)
        moved += tensor.numel() * tensor.element_size()
    return moved


def offload(graph, names: list[str], keep_below_bytes: int = 0) -> None:
    """Drop the device copies: tensors of at least keep_below_bytes become meta placeholders of
    the same shape (they live on disk, in the artifact being built); smaller ones move to CPU."""
    for name in names:
        t = graph.attr(name)
        if t.device.type == "meta":
            continue
        if t.numel() * t.element_size() >= keep_below_bytes:
            graph.set_attr(name, torch.empty(t.shape, dtype=t.dtype, device="meta"))
        else:
            graph.set_attr(name, t.cpu())


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim). A block's buffers are tens
    of MB to GB; glibc raises its mmap threshold after the first ones are freed, serves the next
    blocks' buffers from the heap and keeps them there once freed, so without this the process's
    resident memory grows with depth though nothing it holds does."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to trim, or another allocator's policy
        return None


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": the GPU when one is present, else CPU; "cuda" without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"device={str(device)!r}: no CUDA GPU is visible to torch "
                               f"{torch.__version__} here; use device='cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"device={str(device)!r}: calibration runs on 'cpu' or 'cuda'")
    return dev
