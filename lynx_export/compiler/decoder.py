"""A decoder graph's input/output convention, and consistent steps for it.

`DecoderIO.read(model)` reads what each graph input is, by name, shape and the graph's own nodes:

1. token ids: `input_ids` [B,S] (else the first input: token ids when integer, hidden rows of a bare
   MoE stack [T,H] or [B,S,H] when float); integer ids stay below the table they index;
2. `attention_mask` [B,P+S]: ones over the past and the new tokens;
3. `position_ids` [B,S]: P + 0..S-1;
4. `total_sequence_length` (GroupQueryAttention graphs): P+S as int32;
5. KV caches, each paired with its present output: onnxruntime-genai's and optimum's
   `past_key_values.N.key|value` -> `present.N.key|value`, this project's `past_key.N` /
   `past_value.N` -> `present_key.N` / `present_value.N`; their axis 2 is the past length P;
6. recurrent states (`past.N.conv` -> `present.N.conv`) and any other input: random values at
   their shape.

Conventions differ in what a step may be. onnxruntime-genai's graphs (GroupQueryAttention) take no
past in a prefill of more than one row ("batch_size must be 1 when sequence_length > 1 and past
context is given"), need a cache at least a sliding window long, and leave the present slots a
step did not write uninitialised: their steps prefill from an empty cache, decode after
max(context, window) tokens, and only the rows a step wrote count (`Step.meaningful`). Other
graphs keep `context` past tokens in every step and all of every output counts.

A symbolic dimension is known from the inputs above (batch, sequence, past, total), from
`genai_config.json` beside the model (`head_size`: the cache's last axis), or from `dims` given by
the user (`build --dim NAME=SIZE`); an input holding any other is refused in one line naming it.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from lynx_export.compiler.genai_folder import read_decoder_config
from lynx_export.errors import RunError

__all__ = ["DecoderIO", "Step"]

_CACHE = re.compile(r"^(?:past_key_values\.(?P<layer>\d+)\.(?P<kind>key|value)|past_(?P<kind2>key|value)\.(?P<layer2>\d+))$")


def _present_name(past: str) -> str:
    """The present output a cache or state input is paired with, by each convention's naming."""
    if m := _CACHE.match(past):
        if m["layer"] is not None:
            return f"present.{m['layer']}.{m['kind']}"
        return f"present_{m['kind2']}.{m['layer2']}"
    return "present" + past.removeprefix("past")


@dataclass(frozen=True)
class Step:
    """One step's inputs, and which part of each output it defines (an index into the output)."""

    feeds: dict[str, np.ndarray]
    past: int
    # output -> the part of it this step defines (an index), None where it defines none; absent: all
    meaningful: dict[str, tuple[slice, ...] | None] = field(default_factory=dict)

    def defined(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The parts of a run's `outputs` this step defines (the outputs it defines nothing of left out)."""
        return {name: value if name not in self.meaningful else np.ascontiguousarray(value[self.meaningful[name]])
                for name, value in outputs.items() if self.meaningful.get(name, ()) is not None}


@dataclass(frozen=True)
class DecoderIO:
    """What a graph's inputs are and how to make a step for it (see the module docstring)."""

    inputs: tuple[tuple[str, tuple[int | str | None, ...], np.dtype], ...]  # name, dims, dtype
    ids: str | None  # the token-id (or hidden-row) input: axes 0 and 1 are batch and sequence
    caches: tuple[str, ...]  # KV cache inputs (axis 2: past length)
    index_bounds: dict[str, int]  # integer input -> largest valid value + 1
    symbols: dict[str, int]  # dims known from the model folder or the user
    in_place_cache: bool  # GroupQueryAttention: prefill from an empty cache, compare written rows
    window: int = 0  # sliding window: a step's windowed caches hold at least this many rows
    windowed: tuple[str, ...] = ()  # the cache inputs of sliding-window layers
    outputs: tuple[str, ...] = ()

    @classmethod
    def read(cls, model: ir.Model, folder: pathlib.Path | None = None, dims: Mapping[str, int] | None = None) -> DecoderIO:
        inputs = tuple((v.name, tuple(_dim(d) for d in (v.shape or [])), np.dtype(v.dtype.numpy())) for v in model.graph.inputs)
        names = [name for name, _, _ in inputs]
        ids = "input_ids" if "input_ids" in names else (names[0] if names else None)
        caches = tuple(n for n in names if _CACHE.match(n))
        config = read_decoder_config(folder) if folder is not None else {}
        symbols: dict[str, int] = {}
        if isinstance(config.get("head_size"), int):  # the caches' last axis
            symbols.update({shape[3]: config["head_size"] for name, shape, _ in inputs if name in caches and len(shape) == 4
                            and isinstance(shape[3], str)})
        window, windowed_layers = 0, set()
        sliding = config.get("sliding_window")
        if isinstance(sliding, dict) and isinstance(sliding.get("window_size"), int) and isinstance(sliding.get("layers"), list):
            window, windowed_layers = sliding["window_size"], {str(layer) for layer in sliding["layers"]}
        symbols.update(dims or {})
        bounds = {v.name: _index_bound(v) for v in model.graph.inputs if v.dtype is not None and np.issubdtype(v.dtype.numpy(), np.integer)}
        decoder = cls(inputs=inputs, ids=ids, caches=caches, index_bounds=bounds, symbols=symbols,
                      in_place_cache=any(node.op_type == "GroupQueryAttention" for node in model.graph), window=window,
                      windowed=tuple(n for n in caches if _layer(n) in windowed_layers), outputs=tuple(v.name for v in model.graph.outputs))
        stepped = set(decoder._sizes(1, 1, 0, given=False))  # batch, sequence, past, total: each case sets them
        for name in sorted(set(dims or {}) & stepped):
            raise RunError(f"dimension '{name}' is set by each verification case (batch, sequence, past or total length); it cannot be given")
        sizes = decoder._sizes(1, 1, 0)
        for name, shape, _ in inputs:  # every input can be filled, or the one that cannot is named now
            if name != "total_sequence_length":
                decoder._shape(name, shape, sizes)
        return decoder

    @property
    def presents(self) -> dict[str, str]:
        """KV cache input -> the present output it is paired with (those the graph has)."""
        return {cache: _present_name(cache) for cache in self.caches if _present_name(cache) in self.outputs}

    @property
    def in_place(self) -> dict[str, str]:
        """The pairs of `presents` a step binds to one buffer (GroupQueryAttention graphs); none otherwise."""
        return self.presents if self.in_place_cache else {}

    def step(self, batch: int, seq_len: int, context: int, rng: np.random.Generator) -> Step:
        """Inputs for `batch` rows of `seq_len` new tokens (see the module docstring for the past)."""
        past = (0 if seq_len > 1 else max(context, self.window if self.windowed else 0)) if self.in_place_cache else context
        sizes = self._sizes(batch, seq_len, past)
        feeds: dict[str, np.ndarray] = {}
        for name, dims, dtype in self.inputs:
            if name == "total_sequence_length":
                feeds[name] = np.full([d if isinstance(d, int) else 1 for d in dims], past + seq_len, dtype=dtype)
                continue
            shape = self._shape(name, dims, sizes)
            if name == "attention_mask":
                feeds[name] = np.ones(shape, dtype=dtype)
            elif name == "position_ids":
                feeds[name] = np.broadcast_to(past + np.arange(shape[-1]), shape).astype(dtype)
            elif np.issubdtype(dtype, np.integer):
                feeds[name] = rng.integers(0, self.index_bounds.get(name, 2), size=shape).astype(dtype)
            elif dtype == np.bool_:
                feeds[name] = np.ones(shape, dtype=bool)
            else:
                feeds[name] = rng.standard_normal(shape).astype(dtype)
        meaningful: dict[str, tuple[slice, ...] | None] = {}
        if self.in_place_cache:
            # Only the rows this step wrote; where a sliding window's buffer puts them is the
            # kernel's business, and its other slots are uninitialised: none of it.
            for cache, present in self.presents.items():
                meaningful[present] = None if cache in self.windowed else (slice(None), slice(None), slice(past, past + seq_len))
        return Step(feeds=feeds, past=past, meaningful=meaningful)

    def _sizes(self, batch: int, seq_len: int, past: int, given: bool = True) -> dict[str, int]:
        """Symbol -> size for this step: batch and sequence from the ids, past from the caches'
        axis 2, total from the mask's axis 1, over what the folder and the user gave (`given`)."""
        sizes = dict(self.symbols) if given else {}
        by_name = {name: dims for name, dims, _ in self.inputs}
        for name, axis, size in ((self.ids, 0, batch), (self.ids, 1, seq_len), ("attention_mask", 1, past + seq_len)):
            dims = by_name.get(name) if name is not None else None
            if dims is not None and axis < len(dims) and isinstance(dims[axis], str):
                sizes[dims[axis]] = size
        for cache in self.caches:
            dims = by_name[cache]
            if len(dims) > 2 and isinstance(dims[2], str):
                # A sliding-window layer's cache is a buffer at least the window long, however few
                # of its rows hold past tokens (the mask says how many).
                sizes[dims[2]] = max(past, self.window) if cache in self.windowed else past
        return sizes

    def _shape(self, name: str, dims: tuple[int | str | None, ...], sizes: Mapping[str, int]) -> list[int]:
        shape = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim is not None and dim in sizes:
                shape.append(sizes[dim])
            else:
                what = f"'{dim}'" if dim is not None else "unnamed"
                raise RunError(f"input '{name}': cannot tell the size of its {what} dimension (axis {axis}); give it with build --dim NAME=SIZE"
                                if dim is not None else f"input '{name}': its axis {axis} has no size and no name to give one")
        return shape


def _layer(cache: str) -> str:
    m = _CACHE.match(cache)
    return m["layer"] if m["layer"] is not None else m["layer2"]


def _dim(d: object) -> int | str | None:
    if isinstance(d, int):
        return d
    text = str(d) if d is not None else ""
    return text or None


def _index_bound(value: ir.Value) -> int:
    """Largest valid id + 1 for an integer input: the table size of the Gather it indexes."""
    for node, index in value.uses():
        if node.op_type in ("Gather", "GatherBlockQuantized") and index == 1 and node.inputs[0] is not None and node.inputs[0].shape:
            dim = node.inputs[0].shape[0]
            if isinstance(dim, int):
                return dim
    return 2
