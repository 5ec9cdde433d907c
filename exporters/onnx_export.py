"""Hugging Face folder -> fp32 ONNX with KV cache (optimum-onnx), tokenizer and configs kept."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from workbench.errors import WorkbenchError
from workbench.errors import write_errno
from workbench.jobs import Cancelled, Progress, never_cancelled, no_progress
from workbench.layout import MODEL_FILE, SIDE_FILES, folder_bytes, save_model
from workbench.sources import EXPORT_TASK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the folder holding model.onnx
    bytes: int


def export_onnx(
    model_dir: Path,
    dest: Path,
    *,
    parameters: int,
    trust_remote_code: bool = False,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> ExportResult:
    """Export in a child process (torch's exporter cannot be interrupted) so Cancel works."""
    from workbench.subprocess_job import run_in_subprocess

    run_in_subprocess(
        "exporters.onnx_export:export_in_process",
        {"model_dir": str(model_dir), "dest": str(dest), "trust_remote_code": trust_remote_code},
        progress=progress,
        cancelled=cancelled,
        # Measured here: ~23 s for 135M parameters on 2 cores, plus start-up.
        expected_seconds=8.0 + parameters / 6e6,
        message="exporting to ONNX",
    )
    return ExportResult(path=dest, bytes=folder_bytes(dest))


def export_in_process(model_dir: str, dest: str, trust_remote_code: bool, progress: Progress = no_progress) -> None:
    import gc

    from optimum.exporters.onnx import main_export
    from transformers import AutoConfig

    progress(0.05, "tracing the model")
    try:
        main_export(
            model_dir,
            output=dest,
            task=EXPORT_TASK,
            device="cpu",
            dtype="fp32",
            do_validation=False,
            trust_remote_code=trust_remote_code,
            # optimum's post-processing only ties a tied lm_head to the embeddings, and fails on a graph over
            # 2 GB (it sizes the whole graph as one protobuf message): tie_lm_head below does it instead.
            no_post_process=True,
        )
    except (ValueError, OSError, RuntimeError) as error:
        if write_errno(error):
            raise  # the disk, not the model: the run folder's own message names it (staged_dir)
        raise WorkbenchError(f"Exporting the model to ONNX failed: {error}") from error
    for name in SIDE_FILES:
        source, target = Path(model_dir) / name, Path(dest) / name
        if source.is_file() and not target.exists():
            shutil.copy2(source, target)
    if not (Path(dest) / MODEL_FILE).is_file():
        raise WorkbenchError(f"The ONNX export produced no {MODEL_FILE}; see the log for optimum's messages.")
    gc.collect()  # the PyTorch model sits in reference cycles: free it before the graph is loaded
    progress(0.9, "moving the weights to model.onnx.data")
    model = onnx.load(str(Path(dest) / MODEL_FILE))
    if getattr(AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code), "tie_word_embeddings", False):
        tie_lm_head(model)
    save_model(model, Path(dest))


def tie_lm_head(model: onnx.ModelProto) -> None:
    """Have a tied lm_head read the embeddings through a Transpose instead of its own transposed copy.

    The exporter writes the copy as one more initializer, (hidden, vocabulary) where the embeddings
    are (vocabulary, hidden); the INT4 pass quantizes a weight read through a Transpose once for both
    (workbench.quantization.int4_graph.find_targets)."""
    from onnx import helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    embeddings = [initializers[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in initializers
                  and len(initializers[n.input[0]].dims) == 2]
    if len(embeddings) != 1:
        return
    embedding = embeddings[0]
    heads = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers
             and list(initializers[n.input[1]].dims) == list(reversed(embedding.dims))]
    if len(heads) != 1:  # no copy (or more than one matrix of that shape): nothing to tie for sure
        return
    head = heads[0]
    copy = initializers[head.input[1]]
    transposed = f"{embedding.name}/transposed"
    graph.node.insert(list(graph.node).index(head), helper.make_node(
        "Transpose", [embedding.name], [transposed], name=f"{head.name}/tied_weight", perm=[1, 0]))
    head.input[1] = transposed
    if not any(copy.name in n.input for n in graph.node):
        del graph.initializer[list(initializers).index(copy.name)]
