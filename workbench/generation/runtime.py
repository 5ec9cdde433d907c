"""The workbench side of generation: provider choice, a model folder with its tokenizer and chat
template, JSON-schema constrained decoding, GPU memory. The decode loop is workbench.generation.engine."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.layout import MODEL_FILE
from workbench.generation import engine
from workbench.errors import WorkbenchError
from workbench.generation.engine import (
    CPU,
    CUDA,
    GenerationConfig,
    GenerationError,
    GenerationResult,
)

log = logging.getLogger(__name__)
PROVIDERS = {"cpu": CPU, "cuda": CUDA}
# A JSON answer that runs out of tokens is steered to close within this many more.
JSON_CLOSING_TOKENS = 64
CLOSING_BIAS = 100.0
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ProviderChoice:
    name: str  # cpu | cuda
    providers: list[str]
    reason: str  # why this provider, in words


def choose_provider(requested: str = "auto") -> ProviderChoice:
    """`auto` takes CUDA when a session really starts on it; asking for CUDA without it is an error.

    onnxruntime-gpu lists the CUDA provider even where no GPU or CUDA library exists, and then
    quietly runs on the CPU, so the only honest test is to start a session.
    """
    if requested not in ("auto", *PROVIDERS):
        raise WorkbenchError(f"Unknown provider {requested!r}; choose auto, cpu or cuda.")
    if requested == "cpu":
        return ProviderChoice("cpu", [CPU], "asked for")
    works, why_not = cuda_status()
    if works:
        return ProviderChoice("cuda", [CUDA, CPU], "CUDA is available")
    if requested == "cuda":
        raise WorkbenchError(
            f"CUDA was asked for, but it cannot be used here: {why_not}. Choose the CPU provider "
            "(--provider cpu), or install onnxruntime-gpu with a working NVIDIA driver and CUDA libraries."
        )
    return ProviderChoice("cpu", [CPU], f"CUDA cannot be used: {why_not}")


@functools.cache
def cuda_status() -> tuple[bool, str]:
    """(works, why not): start a one-node session on CUDA and see where it runs."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if CUDA not in ort.get_available_providers():
        return False, "this ONNX Runtime has no CUDA provider"
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with _captured_stderr() as captured:
        try:
            session = ort.InferenceSession(model.SerializeToString(), engine.session_options(), providers=[CUDA, CPU])
            started = CUDA in session.get_providers()
        except Exception as error:  # ORT raises its own types for a broken CUDA setup
            return False, f"the CUDA provider failed to start ({error})"
    if started:
        return True, ""
    causes = [line.rsplit("error: ", 1)[1].strip() for line in captured() if "error: " in line]
    return False, causes[-1] if causes else "the CUDA provider did not start (no GPU or CUDA libraries found)"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], list[str]]]:
    """ONNX Runtime reports a failed provider on file descriptor 2; keep it for the reason shown."""
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        lines: list[str] = []
        try:
            yield lambda: lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().splitlines())


def model_files(model_dir: Path) -> list[str]:
    """model.onnx and the files holding its external weights, checked to be there in full.

    A folder missing its weights (a partial copy, a deleted file) is refused here in plain words rather
    than by ONNX Runtime's "external data path validation failed" when a session opens it.
    """
    import onnx

    path = Path(model_dir) / MODEL_FILE
    incomplete = (f"{model_dir} is incomplete: {{}}. The folder was damaged or only partly copied: copy it again. "
                  "Quantize the model again if you have no intact copy.")
    if not path.is_file():
        raise WorkbenchError(incomplete.format(f"{MODEL_FILE} is missing"))
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # onnx raises its own DecodeError for a damaged protobuf
        raise WorkbenchError(incomplete.format(f"{MODEL_FILE} cannot be read ({error})")) from error
    needed: dict[str, int] = {}
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {e.key: e.value for e in tensor.external_data}
            end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
            needed[entry["location"]] = max(needed.get(entry["location"], 0), end)
    for name, end in needed.items():
        data = Path(model_dir) / name
        if not data.is_file():
            raise WorkbenchError(incomplete.format(f"{name}, which holds the model's weights, is missing"))
        if data.stat().st_size < end:
            raise WorkbenchError(incomplete.format(
                f"{name}, which holds the model's weights, has {data.stat().st_size:,} of {end:,} bytes"))
    return [MODEL_FILE, *needed]


class OnnxCausalLM(engine.CausalLM):
    """One exported model folder (model.onnx + config.json) in an ORT session on a chosen provider."""

    def __init__(self, model_dir: Path, provider: str = "cpu", threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.provider = choose_provider(provider)
        path = self.model_dir / MODEL_FILE
        model_files(self.model_dir)
        super().__init__(
            str(path), providers=self.provider.providers, threads=threads, context_length=context_length_of(self.model_dir)
        )
        if self.provider.name == "cuda" and self.device != "cuda":
            raise WorkbenchError("The CUDA provider failed to start for this model; choose the CPU provider.")
        log.info("%s on %s (%s)", self.model_dir.name, self.provider.name, self.provider.reason)


def context_length_of(model_dir: Path) -> int | None:
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("max_position_embeddings") or data.get("n_positions")


class ChatModel:
    """A model folder ready to answer: session, tokenizer, chat template, end-of-sequence ids."""

    def __init__(self, model_dir: Path, provider: str = "auto", threads: int | None = None):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.lm = OnnxCausalLM(self.model_dir, provider, threads)  # last: loading trims what the tokenizer freed
        self.eos_token_ids = eos_token_ids_of(self.model_dir, self.tokenizer)

    @functools.cached_property
    def grammar_tokenizer(self):
        """llguidance's view of the vocabulary (about a second to build, so built once)."""
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.lm.vocab_size, eos_token=self.eos_token_ids)

    @functools.cached_property
    def closing_ids(self) -> np.ndarray:
        """Tokens made only of quotes and closing brackets: what ends a JSON value soonest."""
        pieces = self.tokenizer.convert_ids_to_tokens(range(len(self.tokenizer)))
        texts = [self.tokenizer.convert_tokens_to_string([p]) if p else "" for p in pieces]
        return np.array([i for i, t in enumerate(texts) if t.strip() and set(t.strip()) <= set('"]}')], np.int64)

    @property
    def text_tokenizer(self):
        """The Rust `tokenizers.Tokenizer` the portable engine decodes with."""
        return self.tokenizer.backend_tokenizer

    def encode(
        self, prompt: str, system: str | None = None, chat: bool = True, history: Sequence[tuple[str, str]] = ()
    ) -> list[int]:
        """Token ids of `prompt` after the earlier (prompt, answer) turns of `history`, wrapped in the
        chat template when the model has one (else the turns are joined by blank lines)."""
        if chat and self.tokenizer.chat_template:
            messages = [{"role": "system", "content": system}] if system else []
            for asked, answered in history:
                messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
            messages.append({"role": "user", "content": prompt})
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        if system:
            raise WorkbenchError(f"{self.model_dir.name} has no chat template, so a system prompt cannot be used.")
        return self.tokenizer("\n\n".join([*(text for turn in history for text in turn), prompt]))["input_ids"]

    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        *,
        on_token: engine.TokenCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        json_schema: dict | None = None,
        truncate: bool = False,
    ) -> GenerationResult:
        processor = None
        if json_schema is not None:
            processor = JsonSchemaConstraint(self.grammar_tokenizer, json_schema, config.max_new_tokens, self.closing_ids)
            config = dataclasses.replace(config, max_new_tokens=config.max_new_tokens + JSON_CLOSING_TOKENS)
        with user_errors():
            result = engine.generate(
                self.lm, prompt_ids, config, tokenizer=self.text_tokenizer, eos_token_ids=self.eos_token_ids,
                on_token=on_token, cancelled=cancelled, logits_processor=processor, truncate=truncate,
            )
        if processor is not None and result.finish_reason not in ("eos", "cancelled"):
            raise WorkbenchError(
                f"The JSON answer was not complete after {len(result.tokens)} tokens ({result.finish_reason}); "
                "allow more new tokens, or simplify the schema (e.g. maxItems, maxLength)."
            )
        return result

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], config: GenerationConfig, *, cancelled=None, truncate: bool = False
    ) -> list[GenerationResult]:
        with user_errors():
            return engine.generate_batch(
                self.lm, prompts, config, tokenizer=self.text_tokenizer, eos_token_ids=self.eos_token_ids,
                cancelled=cancelled, truncate=truncate,
            )

    def generate_speculative(
        self, draft: ChatModel, prompt_ids: Sequence[int], config: GenerationConfig, *, draft_tokens: int = 4,
        on_token=None, cancelled=None, truncate: bool = False,
    ) -> GenerationResult:
        with user_errors():
            return engine.generate_speculative(
                self.lm, draft.lm, prompt_ids, config, draft_tokens=draft_tokens, tokenizer=self.text_tokenizer,
                eos_token_ids=self.eos_token_ids, on_token=on_token, cancelled=cancelled, truncate=truncate,
            )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The portable engine cannot import WorkbenchError; its GenerationError means the same."""
    try:
        yield
    except GenerationError as error:
        raise WorkbenchError(str(error)) from error


def eos_token_ids_of(model_dir: Path, tokenizer) -> list[int]:
    """generation_config.json's end-of-sequence ids, and the tokenizer's."""
    ids: list[int] = []
    config = model_dir / "generation_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


class JsonSchemaConstraint:
    """A logits processor that only allows tokens keeping the text a prefix of a schema-valid JSON.

    llguidance compiles the schema to a grammar over the tokenizer's own tokens (offline, from
    tokenizer.json); once the JSON is complete only end-of-sequence remains allowed.
    """

    def __init__(self, grammar_tokenizer, schema: dict, budget: int, closing_ids: np.ndarray):
        import llguidance

        self.budget = budget
        self.closing_ids = closing_ids
        try:
            # Fixed separators: free whitespace lets a small model pad the answer forever.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        except ValueError as error:
            raise WorkbenchError(f"The JSON schema cannot be used: {error}") from error
        problem = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise WorkbenchError(f"The JSON schema cannot be used: {problem}")
        self.matcher = llguidance.LLMatcher(grammar_tokenizer, grammar)
        self.mask = np.full((1, (grammar_tokenizer.vocab_size + 31) // 32), -1, np.int32)
        self.consumed = 0

    def __call__(self, tokens: Sequence[int], logits: np.ndarray) -> None:
        import llguidance.numpy

        for token in tokens[self.consumed:]:
            if not self.matcher.consume_token(token):
                raise WorkbenchError(f"The answer left the JSON schema at token {token}: {self.matcher.get_error()}")
        self.consumed = len(tokens)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.mask)
        llguidance.numpy.apply_token_bitmask_inplace(logits[None, :], self.mask)
        if len(tokens) >= self.budget:  # past the answer's budget: steer towards closing the JSON
            logits[self.closing_ids[self.closing_ids < logits.size]] += CLOSING_BIAS


@contextlib.contextmanager
def _nvml():
    """NVML initialised for the block, or None where NVML or a GPU is missing."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        log.debug("NVML unavailable: %s", error)
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_bytes() -> int | None:
    """GPU memory this process holds now (NVML), or None where NVML or a GPU is missing.

    ONNX Runtime's CUDA arena keeps what it once took, so a reading after generation is the peak.
    """
    with _nvml() as nvml:
        if nvml is None:
            return None
        used = 0
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == os.getpid() and process.usedGpuMemory:
                    used += process.usedGpuMemory
        return used


def gpu_memory() -> tuple[int, int] | None:
    """(total, free) bytes of the first GPU, or None without one: the Model step's fit verdict."""
    with _nvml() as nvml:
        if nvml is None or nvml.nvmlDeviceGetCount() == 0:
            return None
        info = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0))
        return int(info.total), int(info.free)
