"""A portable decoding engine for ONNX causal LMs exported by optimum (text-generation-with-past).

This file depends only on numpy, onnxruntime and, for text, `tokenizers`: the deployable bundle
ships it unchanged as the engine of its runner. It works on token ids; chat templates are
rendered by the caller.

The graph's interface: inputs input_ids, attention_mask, [position_ids], past_key_values.N.key /
.value (batch, kv_heads, past, head_dim); outputs logits, present.N.key / .value. The KV cache
stays in ONNX Runtime values between steps (IO binding), on the GPU when the session runs there,
so no per-token copies go through numpy; logits are written straight into a numpy buffer.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# An optional graph input (an overridable initializer, 0 = all): how many last positions get logits.
LOGITS_TO_KEEP = "logits_to_keep"
# Model metadata written by the workbench's attention fusion. Its GroupQueryAttention nodes can read
# and write one preallocated KV buffer per layer, so the cache does not grow by copying every step,
# and take each row's length from the attention mask (right padding). Graphs fused before that say
# "GroupQueryAttention" and are run as graphs whose cache grows (correct, without the shared buffer).
FUSED_KEY = "int4_workbench.attention"
FUSED_VALUE = "GroupQueryAttention; row lengths from the mask"
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; a later read brings them back
# While a session loads, the mapped weights file is paged out this often (seconds): ONNX Runtime
# reads it through once to prepack, and at a few hundred MB/s a tenth of a second leaves little behind.
PAGE_OUT_INTERVAL_S = 0.1
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Streamed GPTQ (a small wide model, 12 layers): the high-water mark rose about 40 MiB a layer with glibc's
# moving threshold, 13 with the heap trimmed after each layer, and stayed flat with this fixed one.
MMAP_THRESHOLD_BYTES = 2**20
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

# (token ids generated so far, logits over the vocabulary) -> None; edits the logits in place.
LogitsProcessor = Callable[[Sequence[int], np.ndarray], None]
# (token id, text that became final with it; may be empty) -> None
TokenCallback = Callable[[int, str], None]


class GenerationError(ValueError):
    """Bad settings or input; the message says what to change."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens. temperature 0 is greedy decoding (top_k/top_p/seed then do nothing)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}.")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be 0 (greedy) or more, not {self.temperature}.")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be 0 (no limit) or more, not {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], not {self.top_p}.")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be positive (1 = none), not {self.repetition_penalty}.")
        if any(not s for s in self.stop):
            raise GenerationError("Stop strings must not be empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids, end-of-sequence excluded
    text: str  # the streamed pieces joined; cut before a stop string
    finish_reason: str  # length | eos | stop | context | cancelled
    prompt_tokens: int
    ttft_s: float  # prompt in -> first token out
    total_s: float
    truncated_prompt_tokens: int = 0  # dropped from the prompt's start to fit the context
    draft: dict = field(default_factory=dict)  # speculative decoding: proposed, accepted, acceptance_rate

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (the prompt's cost is in ttft_s)."""
        decode = self.total_s - self.ttft_s
        return (len(self.tokens) - 1) / decode if len(self.tokens) > 1 and decode > 0 else 0.0


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """`spinning` False: ONNX Runtime's threads sleep between parallel work instead of spinning, leaving the
    cores to other threads of the process (a server's) and to other processes."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class KVCache:
    """One sequence batch's past keys and values, as ONNX Runtime values, plus its attention mask.

    For a graph that shares KV buffers the values have room for more positions than `length`;
    the graph writes each step's keys and values into them in place.
    """

    def __init__(self, values: list[ort.OrtValue], mask: np.ndarray):
        self.values = values
        self.mask = mask  # (batch, length) int64: 1 for real tokens, 0 for left padding

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def capacity(self) -> int:
        return self.values[0].shape()[2] if self.values else 0


class CausalLM:
    """An exported decoder in an ONNX Runtime session; one step = one forward pass with the cache."""

    def __init__(
        self,
        path: str,
        *,
        providers: Sequence[str] = (CPU,),
        threads: int | None = None,
        context_length: int | None = None,
        spinning: bool = True,
    ):
        folder = os.path.dirname(os.path.abspath(path))
        with paging_out(folder):
            self.session = ort.InferenceSession(str(path), session_options(threads, spinning),
                                                providers=list(providers))
        self.device = "cuda" if CUDA in self.session.get_providers() else "cpu"
        self.context_length = context_length
        inputs = self.session.get_inputs()
        self.input_names = {i.name for i in inputs}
        self.past_inputs = [i for i in inputs if PAST_INPUT.match(i.name)]
        self.past_names = [i.name for i in self.past_inputs]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        first = self.past_inputs[0] if self.past_inputs else None
        self.kv_heads = first.shape[1] if first is not None else 0
        self.head_dim = first.shape[3] if first is not None else 0
        self.kv_dtype = ORT_TYPES.get(first.type, np.float32) if first is not None else np.float32
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        # Graphs from our optimizer can skip the vocabulary projection for all but the last positions.
        self.keeps_logits = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}
        self.shares_kv = self.session.get_modelmeta().custom_metadata_map.get(FUSED_KEY) == FUSED_VALUE
        release_unused_memory(folder)

    # -- numpy interface (whole-text scoring) -------------------------------------------------

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype) for name in self.past_names}

    def forward(
        self,
        input_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits for `input_ids` (batch, seq) after `past`; returns logits and the new past."""
        batch, length = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        past_length = next(iter(past.values())).shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_length + length), np.int64)
        feeds = {**self._token_feeds(np.asarray(input_ids, np.int64), attention_mask), **past}
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        present = {
            name.replace("present", "past_key_values"): value
            for name, value in zip(names, outputs)
            if name.startswith("present")
        }
        return outputs[names.index("logits")], present

    # -- cached stepping (generation) ---------------------------------------------------------

    def new_cache(self, batch: int = 1, capacity: int = 0) -> KVCache:
        """An empty cache; a graph that shares KV buffers gets room for `capacity` positions at once."""
        if self.context_length is not None:
            capacity = min(capacity, self.context_length)
        room = capacity if self.shares_kv else 0
        shape = [batch, self.kv_heads, room, self.head_dim]
        values = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self.device, 0) for _ in self.past_names]
        return KVCache(values, np.zeros((batch, 0), np.int64))

    def step(self, cache: KVCache, input_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Run `input_ids` (batch, seq) after the cache, extend the cache; logits (batch, seq, vocab).

        `last_only` returns the last position's logits alone (batch, 1, vocab): a long prompt's
        logits are the largest buffer of a step.
        """
        input_ids = np.ascontiguousarray(input_ids, np.int64)
        batch, length = input_ids.shape
        mask = np.concatenate([cache.mask, np.ones((batch, length), np.int64)], axis=1)
        if self.shares_kv and mask.shape[1] > cache.capacity:
            self._grow(cache, max(mask.shape[1], 2 * cache.capacity))

        def bind_cache(binding: ort.IOBinding) -> None:
            for name, value in zip(self.past_names, cache.values):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(self.present_names, cache.values):
                if self.shares_kv:
                    binding.bind_ortvalue_output(name, value)
                else:
                    binding.bind_output(name, self.device)

        logits, binding = self._run(input_ids, mask, bind_cache, last_only)
        if not self.shares_kv:
            cache.values = binding.get_outputs()[1:]
        cache.mask = mask
        return logits[:, -1:] if last_only else logits

    def _run(
        self, input_ids: np.ndarray, mask: np.ndarray, bind_cache: Callable[[ort.IOBinding], None], last_only: bool
    ) -> tuple[np.ndarray, ort.IOBinding]:
        """One forward pass; `bind_cache` binds the past and present KV (after the logits, output 0)."""
        batch, length = input_ids.shape
        binding = self.session.io_binding()
        for name, value in self._token_feeds(input_ids, mask).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        vocab = self.vocab_size or self._probe_vocab()
        kept = 1 if last_only and self.keeps_logits else length
        if kept < length:
            binding.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(np.array([kept], np.int64)))
        logits = np.empty((batch, kept, vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        bind_cache(binding)
        self.session.run_with_iobinding(binding)
        return logits, binding

    def truncate(self, cache: KVCache, length: int) -> None:
        """Forget everything after the first `length` positions (rejected speculative tokens)."""
        if length == cache.length:
            return
        if not self.shares_kv:  # a shared buffer's stale positions are simply written over
            cache.values = [self._copy(value, length, length) for value in cache.values]
        cache.mask = cache.mask[:, :length]

    def _grow(self, cache: KVCache, capacity: int) -> None:
        log.debug("KV buffers grown from %d to %d positions", cache.capacity, capacity)
        cache.values = [self._copy(value, cache.length, capacity) for value in cache.values]

    def _copy(self, value: ort.OrtValue, length: int, room: int) -> ort.OrtValue:
        """A new value holding the first `length` positions of `value`, with room for `room`."""
        array = np.zeros((*value.shape()[:2], room, value.shape()[3]), self.kv_dtype)
        array[:, :, :length] = value.numpy()[:, :, :length]
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def _token_feeds(self, input_ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "position_ids" in self.input_names:
            positions = np.cumsum(mask, axis=1)[:, -input_ids.shape[1]:] - 1
            feeds["position_ids"] = np.maximum(positions, 0).astype(np.int64)
        return feeds

    def _probe_vocab(self) -> int:
        logits, _ = self.forward(np.zeros((1, 1), np.int64))
        self.vocab_size = logits.shape[-1]
        return self.vocab_size


class Batch:
    """Up to `rows` sequences decoding together in one session (continuous batching).

    A sequence joins between steps, its prompt run into a free row, and leaves between steps; the
    next one reuses its row. Free rows below the highest busy one ride along.

    On a graph that shares KV buffers (fused GroupQueryAttention), rows are right-padded: each
    row's keys and values sit at its own positions 0..length-1 of its row of the buffer, each
    prompt runs alone, and a step writes every row's new token at that row's own length, so
    attention and rotary embedding see a row exactly as `generate` sees it alone. Any prompt that
    leaves room for its answer can join at any time. A free row rides along as one token at
    position 0, which its next prompt writes over.

    On a graph whose cache grows by concatenation, every busy row ends at the same column,
    `columns`: a sequence that joins later is left-padded, and position_ids give its real
    positions. It joins when its prompt fits before the current column; several prompts join an
    empty batch in one left-padded pass; when no row is busy the columns start again from 0.
    """

    def __init__(self, model: CausalLM, rows: int, capacity: int):
        if rows < 1 or capacity < 2:
            raise GenerationError(f"A batch needs at least 1 row and 2 columns, not {rows} and {capacity}.")
        self.model = model
        self.capacity = min(capacity, model.context_length) if model.context_length else capacity
        self.columns = 0  # a growing cache's width (the shared buffer's rows have their own lengths)
        self.lengths: list[int | None] = [None] * rows  # a busy row's tokens in the cache
        self.values: list[ort.OrtValue] = []
        if model.shares_kv:  # one buffer per layer for all rows, written in place by the graph
            shape = (rows, model.kv_heads, self.capacity, model.head_dim)
            self.values = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, model.kv_dtype), model.device, 0)
                           for _ in model.past_names]
            self._row_bytes = int(np.prod(shape[1:])) * np.dtype(model.kv_dtype).itemsize

    @property
    def busy(self) -> list[int]:
        return [row for row, length in enumerate(self.lengths) if length is not None]

    def fits(self, prompt_length: int, new_tokens: int) -> bool:
        """Whether a prompt of `prompt_length` tokens, answered with up to `new_tokens`, can join now."""
        return self.fit_together([(prompt_length, new_tokens)])

    def fit_together(self, requests: Sequence[tuple[int, int]]) -> bool:
        """Whether prompts of (length, up to new tokens) can join now, in one `join`."""
        if not requests or len(requests) > self.lengths.count(None):
            return False
        if self.model.shares_kv:
            return all(length + new <= self.capacity for length, new in requests)
        if self.busy:  # one at a time, its prompt before the current column
            return len(requests) == 1 and requests[0][0] <= self.columns and self.columns + requests[0][1] <= self.capacity
        columns = max(length for length, _ in requests)
        return all(columns + new <= self.capacity for _, new in requests)

    def join(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, np.ndarray]]:
        """Run `prompts` into free rows; each prompt's row and the logits (vocab,) after its last token."""
        lengths = [len(p) for p in prompts]
        if not all(lengths) or not self.fit_together([(length, 1) for length in lengths]):
            raise GenerationError(f"Prompts of {lengths} tokens cannot join this batch now.")
        free = [row for row, length in enumerate(self.lengths) if length is None]
        if self.model.shares_kv:
            joined = []
            for row, prompt in zip(free, prompts):
                ids = np.asarray([prompt], np.int64)
                joined.append((row, self._forward(ids, np.ones_like(ids), row)[0, -1]))
                self.lengths[row] = len(prompt)
            return joined
        if not self.busy:
            self.columns = max(lengths)
        first = free[0]
        ids = np.zeros((len(prompts), self.columns), np.int64)
        mask = np.zeros((len(prompts), self.columns), np.int64)
        for i, prompt in enumerate(prompts):
            ids[i, self.columns - len(prompt):] = prompt
            mask[i, self.columns - len(prompt):] = 1
        # A joining row's first tokens are padding: feeding only its own tokens keeps the pass short.
        width = max(lengths)
        logits = self._forward(ids[:, -width:], mask, first)
        for i, length in enumerate(lengths):
            self.lengths[first + i] = length
        return [(first + i, logits[i, -1]) for i in range(len(prompts))]

    def step(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        """Feed each busy row its next token ({row: token}); the logits (vocab,) after it, per row."""
        if sorted(tokens) != self.busy:
            raise GenerationError("Every busy row, and only those, takes a token in a step.")
        width = max(tokens) + 1
        ids = np.zeros((width, 1), np.int64)
        for row, token in tokens.items():
            ids[row, 0] = token
        if self.model.shares_kv:  # each row's own length, then the new token; a free row: one token
            ends = np.array([1 if n is None else n + 1 for n in self.lengths[:width]], np.int64)
            mask = (np.arange(ends.max())[None, :] < ends[:, None]).astype(np.int64)
        else:  # every row ends at the new column; a row's start is its left padding
            ends = np.array([0 if n is None else n + 1 for n in self.lengths[:width]], np.int64)
            mask = (np.arange(self.columns + 1)[None, :] >= self.columns + 1 - ends[:, None]).astype(np.int64)
        logits = self._forward(ids, mask, None)
        if not self.model.shares_kv:
            self.columns += 1
        for row in tokens:
            self.lengths[row] += 1
        return {row: logits[row, -1] for row in tokens}

    def leave(self, row: int) -> None:
        self.lengths[row] = None
        if not self.busy:
            self.columns = 0
            if not self.model.shares_kv:
                self.values = []
        elif not self.model.shares_kv:
            self._set_rows(max(self.busy) + 1, {})

    def _forward(self, ids: np.ndarray, mask: np.ndarray, join_row: int | None) -> np.ndarray:
        """A step of rows 0.. (join_row None) or prompts run into the rows from `join_row` on."""
        model = self.model
        if model.shares_kv:
            first, width = (0, ids.shape[0]) if join_row is None else (join_row, ids.shape[0])
            shape = [width, model.kv_heads, self.capacity, model.head_dim]

            def bind_rows(binding: ort.IOBinding) -> None:
                for past, present, value in zip(model.past_names, model.present_names, self.values):
                    pointer = value.data_ptr() + first * self._row_bytes
                    binding.bind_input(past, model.device, 0, model.kv_dtype, shape, pointer)
                    binding.bind_output(present, model.device, 0, model.kv_dtype, shape, pointer)

            return model._run(ids, mask, bind_rows, last_only=True)[0]
        # A graph whose cache grows by concatenation: the rows' past is a value per layer, replaced every step.
        if join_row is None:
            past = self.values
        else:
            shape = (ids.shape[0], model.kv_heads, mask.shape[1] - ids.shape[1], model.head_dim)
            past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, model.kv_dtype), model.device, 0)
                    for _ in model.past_names]

        def bind_past(binding: ort.IOBinding) -> None:
            for name, value in zip(model.past_names, past):
                binding.bind_ortvalue_input(name, value)
            for name in model.present_names:
                binding.bind_output(name, model.device)

        logits, binding = model._run(ids, mask, bind_past, last_only=True)
        present = binding.get_outputs()[1:]
        if join_row is None:
            self.values = present
        else:
            arrays = [value.numpy() for value in present]
            joined = range(join_row, join_row + ids.shape[0])
            self._set_rows(max([*joined, *self.busy]) + 1,
                           {row: [array[i] for array in arrays] for i, row in enumerate(joined)})
        return logits

    def _set_rows(self, width: int, new: dict[int, list[np.ndarray]]) -> None:
        """Resize the grown-by-concatenation past to `width` rows, putting `new` rows' values in."""
        model = self.model
        shape = (width, model.kv_heads, self.columns, model.head_dim)
        values = []
        for layer, old in enumerate(self.values or [None] * len(model.past_names)):
            array = np.zeros(shape, model.kv_dtype)
            if old is not None:
                kept = old.numpy()[:width]
                array[: kept.shape[0]] = kept
            for row, arrays in new.items():
                array[row] = arrays[layer]
            values.append(ort.OrtValue.ortvalue_from_numpy(array, model.device, 0))
        self.values = values


def release_unused_memory(model_folder: str) -> None:
    """Hand back to the system memory that loading left behind (Linux with glibc; elsewhere nothing).

    ONNX Runtime maps the weights file and reads it once to prepack the weights into buffers of
    its own; the mapped pages then stay resident, though only the embedding rows of real tokens
    are read again, so the mappings of files in `model_folder` are paged out. glibc also keeps
    the heap that parsing a graph or a tokenizer freed until it is trimmed.
    """
    trim_heap()
    libc = _glibc()
    if libc is not None:
        _page_out(libc, model_folder)


def map_large_blocks() -> None:
    """From now on glibc serves blocks of MMAP_THRESHOLD_BYTES or more from mappings of their own, handed back
    to the system when freed (elsewhere nothing). Its own threshold starts at 128 KiB and rises up to 32 MiB as
    such blocks are freed; above it they come from the heap, where freed pages stay resident and fragment."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def trim_heap() -> None:
    """Hand back to the system the heap pages glibc keeps after they were freed (elsewhere nothing): freed
    blocks below glibc's mapping threshold (which rises to 32 MiB as large blocks are freed) stay resident."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def paging_out(model_folder: str) -> Iterator[None]:
    """While the block runs, page out the mappings of files in `model_folder` every PAGE_OUT_INTERVAL_S.

    Loading reads the whole weights file through its mapping while ONNX Runtime builds the
    prepacked copy, so without this the file's pages and the copy peak together (on an 8B model
    over a GiB above what the loaded session keeps). Session creation runs without the GIL.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    done = threading.Event()

    def page_out() -> None:
        while not done.wait(PAGE_OUT_INTERVAL_S):
            _page_out(libc, model_folder)

    thread = threading.Thread(target=page_out, name="page-out", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _glibc():
    """glibc, on Linux; None elsewhere (or with another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def _page_out(libc, model_folder: str) -> None:
    prefix = os.path.realpath(model_folder) + os.sep
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip().startswith(prefix):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)


# -- picking tokens -------------------------------------------------------------------------------


class Sampler:
    """Repetition penalty, then greedy or temperature / top-k / top-p sampling with a seeded generator."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        config = self.config
        logits = logits.astype(np.float64)
        if config.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / config.repetition_penalty, values * config.repetition_penalty)
        if config.greedy:
            return int(np.argmax(logits))
        logits = logits / config.temperature
        if config.top_k and config.top_k < logits.size:
            threshold = np.partition(logits, -config.top_k)[-config.top_k]
            logits[logits < threshold] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if config.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, config.top_p)) + 1]
            filtered = np.zeros_like(probs)
            filtered[keep] = probs[keep]
            probs = filtered / filtered.sum()
        return int(self.rng.choice(probs.size, p=probs))


class TextStream:
    """Decodes generated ids incrementally; holds back text that may still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        if stop and tokenizer is None:
            raise GenerationError("Stop strings need the model's tokenizer to read the text.")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.emitted = ""
        self.stopped = False

    def push(self, tokens: Sequence[int], final: bool) -> str:
        """The new final text after `tokens` (all generated so far); sets `stopped` on a stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text, final = text[:cut], True
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens
                text = text.rstrip("\ufffd")
            text = text[: len(text) - self._held(text)]
        if not text.startswith(self.emitted):  # a token changed earlier text (rare with byte-level BPE)
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


# -- the loops ------------------------------------------------------------------------------------


def fit_prompt(model: CausalLM, prompt: Sequence[int], truncate: bool) -> tuple[list[int], int]:
    prompt = list(prompt)
    if not prompt:
        raise GenerationError("The prompt is empty.")
    limit = model.context_length
    if limit is None or len(prompt) < limit:
        return prompt, 0
    if not truncate:
        raise GenerationError(
            f"The prompt has {len(prompt)} tokens; this model reads at most {limit}. Shorten the prompt, "
            "or allow truncation to keep only its end."
        )
    keep = max(limit // 2, 1)  # room to answer
    log.warning("prompt of %d tokens truncated to its last %d (context %d)", len(prompt), keep, limit)
    return prompt[-keep:], len(prompt) - keep


def generate(
    model: CausalLM,
    prompt: Sequence[int],
    config: GenerationConfig = GenerationConfig(),
    *,
    tokenizer=None,
    eos_token_ids: Sequence[int] = (),
    on_token: TokenCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    logits_processor: LogitsProcessor | None = None,
    truncate: bool = False,
) -> GenerationResult:
    """Generate after `prompt` (token ids), one token at a time.

    `tokenizer` (a tokenizers.Tokenizer) turns ids into text for streaming and stop strings.
    `cancelled` is asked after every token; a True ends the generation with what was made.
    """
    began = time.perf_counter()
    prompt, dropped = fit_prompt(model, prompt, truncate)
    sampler = Sampler(config)
    answer = Answer(len(prompt), config, model.context_length, tokenizer, eos_token_ids, on_token, cancelled)
    cache = model.new_cache(1, len(prompt) + config.max_new_tokens)
    ttft = 0.0
    feed = np.asarray([prompt], np.int64)
    while True:
        logits = model.step(cache, feed, last_only=True)[0, -1]
        if logits_processor is not None:
            logits_processor(answer.tokens, logits)
        token = sampler(logits, prompt + answer.tokens)
        if not answer.tokens:
            ttft = time.perf_counter() - began
        if answer.add(token):
            break
        feed = np.asarray([[token]], np.int64)
    return GenerationResult(
        tokens=answer.tokens, text=answer.text, finish_reason=answer.finish, prompt_tokens=len(prompt), ttft_s=ttft,
        total_s=time.perf_counter() - began, truncated_prompt_tokens=dropped,
    )


class Answer:
    """One answer as it grows: its tokens, its streamed text, and why it ended."""

    def __init__(self, prompt_length: int, config: GenerationConfig, context_length: int | None, tokenizer,
                 eos_token_ids: Sequence[int], on_token: TokenCallback | None, cancelled: Callable[[], bool] | None):
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.finish = "length"
        self._prompt_length, self._config, self._context = prompt_length, config, context_length
        self._stream = TextStream(tokenizer, config.stop)
        self._eos = set(eos_token_ids)
        self._on_token, self._cancelled = on_token, cancelled

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, token: int) -> bool:
        """Take the model's next token and stream its text; True when the answer is done."""
        ended = token in self._eos
        if not ended:
            self.tokens.append(token)
        # The next step would read the prompt and every token so far.
        self.finish, done = _finish(ended, len(self.tokens), self._config, self._prompt_length + len(self.tokens),
                                    self._context, self._cancelled)
        piece = self._stream.push(self.tokens, final=done)
        if self._stream.stopped:
            self.finish, done = "stop", True
        self.pieces.append(piece)
        # The end token is not part of the answer: streamed only for the text it releases (held back for a stop).
        if self._on_token is not None and (not ended or piece):
            self._on_token(token, piece)
        return done


def _finish(ended: bool, count: int, config: GenerationConfig, next_length: int, context: int | None, cancelled):
    if ended:
        return "eos", True
    if count >= config.max_new_tokens:
        return "length", True
    if context is not None and next_length >= context:
        return "context", True
    if cancelled is not None and cancelled():
        return "cancelled", True
    return "length", False


def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    *,
    tokenizer=None,
    eos_token_ids: Sequence[int] = (),
    cancelled: Callable[[], bool] | None = None,
    truncate: bool = False,
) -> list[GenerationResult]:
    """Several prompts at once in one `Batch`; each row stops on its own and leaves the batch.

    Timings are the batch's: every row reports the batch's first-token and total time.
    """
    began = time.perf_counter()
    fitted = [fit_prompt(model, p, truncate) for p in prompts]
    rows = [p for p, _ in fitted]
    batch = Batch(model, len(rows), max(len(p) for p in rows) + config.max_new_tokens)
    samplers = [Sampler(config) for _ in rows]
    answers = [Answer(len(row), config, model.context_length, tokenizer, eos_token_ids, None, cancelled) for row in rows]
    joined = dict(batch.join(rows))  # rows in prompt order
    ttft = time.perf_counter() - began
    while joined:
        feed = {}
        for i, logits in joined.items():
            token = samplers[i](logits, rows[i] + answers[i].tokens)
            if answers[i].add(token):
                batch.leave(i)
            else:
                feed[i] = token
        joined = batch.step(feed) if feed else {}
    total = time.perf_counter() - began
    return [
        GenerationResult(
            tokens=answer.tokens, text=answer.text, finish_reason=answer.finish, prompt_tokens=len(row), ttft_s=ttft,
            total_s=total, truncated_prompt_tokens=truncated,
        )
        for answer, row, (_, truncated) in zip(answers, rows, fitted)
    ]


def generate_speculative(
    target: CausalLM,
    draft: CausalLM,
    prompt: Sequence[int],
    config: GenerationConfig = GenerationConfig(),
    *,
    draft_tokens: int = 4,
    tokenizer=None,
    eos_token_ids: Sequence[int] = (),
    on_token: TokenCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    truncate: bool = False,
) -> GenerationResult:
    """Greedy decoding of `target`, sped up by `draft` proposing `draft_tokens` tokens at a time.

    The target checks all proposals in one forward pass and keeps the longest prefix it agrees
    with, plus its own next token: the text is the target's greedy text (up to ties in floating
    point between a one-token and a several-token pass).
    """
    if not config.greedy or config.repetition_penalty != 1.0:
        raise GenerationError("Speculative decoding reproduces greedy decoding: use temperature 0 and no repetition penalty.")
    if draft_tokens < 1:
        raise GenerationError(f"draft_tokens must be at least 1, not {draft_tokens}.")
    began = time.perf_counter()
    prompt, dropped = fit_prompt(target, prompt, truncate)
    answer = Answer(len(prompt), config, target.context_length, tokenizer, eos_token_ids, on_token, cancelled)
    # Room for a last round of proposals beyond the answer's budget.
    capacity = len(prompt) + config.max_new_tokens + draft_tokens + 1
    target_cache, draft_cache = target.new_cache(1, capacity), draft.new_cache(1, capacity)
    proposed = accepted = 0
    first = int(np.argmax(target.step(target_cache, np.asarray([prompt], np.int64), last_only=True)[0, -1]))
    ttft = time.perf_counter() - began
    pending = [first]
    while not any(answer.add(token) for token in pending):  # any() stops at the token that ends it
        sequence = prompt + answer.tokens  # the last token is not in either cache yet
        room = config.max_new_tokens - len(answer.tokens)
        if target.context_length is not None:
            room = min(room, target.context_length - len(sequence) - 1)
        k = max(min(draft_tokens, room), 0)
        proposal = _propose(draft, draft_cache, sequence, k)
        proposed += len(proposal)
        # The target's cache holds all but the last token of `sequence`: check [last, *proposal] at once.
        base = target_cache.length
        choices = np.argmax(target.step(target_cache, np.asarray([sequence[-1:] + proposal], np.int64))[0], axis=-1)
        agree = 0
        while agree < len(proposal) and proposal[agree] == int(choices[agree]):
            agree += 1
        accepted += agree
        pending = proposal[:agree] + [int(choices[agree])]
        target.truncate(target_cache, base + 1 + agree)
        draft.truncate(draft_cache, min(draft_cache.length, len(sequence) + agree))
    return GenerationResult(
        tokens=answer.tokens, text=answer.text, finish_reason=answer.finish, prompt_tokens=len(prompt), ttft_s=ttft,
        total_s=time.perf_counter() - began, truncated_prompt_tokens=dropped,
        draft={"proposed": proposed, "accepted": accepted, "acceptance_rate": accepted / proposed if proposed else 0.0},
    )


def _propose(draft: CausalLM, cache: KVCache, sequence: list[int], count: int) -> list[int]:
    """`count` greedy tokens of the draft after `sequence`, feeding it what its cache lacks."""
    proposal: list[int] = []
    feed = sequence[cache.length:]
    for _ in range(count):
        token = int(np.argmax(draft.step(cache, np.asarray([feed], np.int64), last_only=True)[0, -1]))
        proposal.append(token)
        feed = [token]
    return proposal
