"""A Triton Inference Server model configuration (onnxruntime backend) read from the ONNX graph itself.

The graph is stateless: a client sends input_ids, attention_mask, position_ids and the previous
step's present.N.key/value as past_key_values.N.key/value (empty, length 0, on the first step),
exactly what exporters/runner/engine.py does in-process. Triton's own batching is off
(max_batch_size 0): every dimension, the batch included, is spelled out, -1 where it varies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from workbench.errors import WorkbenchError

CONFIG_FILE = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
VERSION = "1"
DATA_TYPES = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.BOOL: "TYPE_BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's name: TYPE_FP32, TYPE_INT64, ...
    dims: tuple[int, ...]  # -1 where the graph names a dimension instead of fixing it


def graph_interface(model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's inputs and outputs, without loading its weights."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = [_spec(v) for v in graph.input if v.name not in initializers]
    return inputs, [_spec(v) for v in graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    if tensor.elem_type not in DATA_TYPES:
        raise WorkbenchError(
            f"The graph's {value.name} has element type {TensorProto.DataType.Name(tensor.elem_type)}, which this "
            "Triton configuration writer does not map; use the runner target instead."
        )
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, DATA_TYPES[tensor.elem_type], dims)


def model_name(text: str) -> str:
    """A Triton model name (also a folder name) made of lower-case letters, digits, - and _."""
    name = re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-_")
    if not name:
        raise WorkbenchError(f"{text!r} gives no usable model name; choose one with letters or digits.")
    return name


def render_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    def block(specs: list[TensorSpec]) -> str:
        entries = [
            f'  {{\n    name: "{s.name}"\n    data_type: {s.data_type}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
            for s in specs
        ]
        return ",\n".join(entries)

    return (
        "# Written by INT4 Workbench from the graph's own inputs and outputs.\n"
        f'name: "{name}"\nplatform: "{PLATFORM}"\nmax_batch_size: 0\n'
        f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"
    )


def check_config(text: str, name: str, model_path: Path) -> None:
    """Read a written config back and compare it with the graph: every input and output, type and shape."""
    config = parse_pbtxt(text)
    inputs, outputs = graph_interface(model_path)
    problems = []
    if config.get("name") != [name]:
        problems.append(f"name {config.get('name')} is not {name!r}")
    if config.get("platform") != [PLATFORM]:
        problems.append(f"platform {config.get('platform')} is not {PLATFORM!r}")
    for field, specs in (("input", inputs), ("output", outputs)):
        written = {
            entry["name"][0]: TensorSpec(entry["name"][0], entry["data_type"][0], tuple(entry["dims"]))
            for entry in config.get(field, [])
        }
        expected = {s.name: s for s in specs}
        for missing in expected.keys() - written.keys():
            problems.append(f"{field} {missing} of the graph is missing")
        for extra in written.keys() - expected.keys():
            problems.append(f"{field} {extra} is not in the graph")
        for key in expected.keys() & written.keys():
            if written[key] != expected[key]:
                problems.append(f"{field} {key} is {written[key]}, the graph has {expected[key]}")
    if problems:
        # The configuration is written from the graph: a mismatch is the writer's bug.
        raise RuntimeError("The Triton configuration does not match the model: " + "; ".join(sorted(problems)))


# -- protobuf text format: the subset the configuration uses ------------------------------------

TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+(?:\.\d+)?)|([A-Za-z_][\w.]*)|([{}\[\]:,]))')


def parse_pbtxt(text: str) -> dict[str, list]:
    """Fields to lists of values (a field may repeat); messages become dicts of the same kind."""
    tokens = _tokens(text)
    fields, end = _message(tokens, 0)
    if end != len(tokens):
        raise ValueError(f"unexpected {tokens[end]!r} at the top level")
    return fields


def _tokens(text: str) -> list:
    tokens, position = [], 0
    while position < len(text.rstrip()):
        match = TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"cannot read the configuration at {text[position:position + 20]!r}")
        position = match.end()
        comment, string, number, word, mark = match.groups()
        if string is not None:
            tokens.append(("value", string[1:-1].encode().decode("unicode_escape")))
        elif number is not None:
            tokens.append(("value", float(number) if "." in number else int(number)))
        elif word is not None:
            tokens.append(("word", word))
        elif mark is not None:
            tokens.append(("mark", mark))
    return tokens


def _message(tokens: list, index: int) -> tuple[dict[str, list], int]:
    fields: dict[str, list] = {}
    while index < len(tokens) and tokens[index] != ("mark", "}"):
        kind, name = tokens[index]
        if kind != "word":
            raise ValueError(f"expected a field name, found {name!r}")
        index += 1
        if tokens[index] == ("mark", ":"):
            index += 1
        values, index = _values(tokens, index)
        fields.setdefault(name, []).extend(values)
        if index < len(tokens) and tokens[index] == ("mark", ","):
            index += 1
    return fields, index


def _values(tokens: list, index: int) -> tuple[list, int]:
    kind, value = tokens[index]
    if (kind, value) == ("mark", "["):
        values, index = [], index + 1
        while tokens[index] != ("mark", "]"):
            item, index = _values(tokens, index)
            values.extend(item)
            if tokens[index] == ("mark", ","):
                index += 1
        return values, index + 1
    if (kind, value) == ("mark", "{"):
        message, index = _message(tokens, index + 1)
        return [message], index + 1
    if kind in ("value", "word"):  # a word here is an enum value such as TYPE_FP32
        return [value], index + 1
    raise ValueError(f"expected a value, found {value!r}")
