"""Calibration data: read the user's file, cut it into token windows, or let the model write its own.

GPTQ and AWQ need (samples, tokens) int64 arrays of realistic text. They come either from a
file (`read_texts` -> `token_samples`) or, data-free, from the model itself
(`self_written_samples`). `preview` summarizes a file for the GUI before anything heavy runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.settings import QuantSettings
from workbench.units import format_size
from workbench.quantization.eval_mode import evaluating

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".csv", ".json")
PREVIEW_SAMPLES = 3
PREVIEW_CHARACTERS = 200
PREVIEW_TOKENS = 2**18  # files up to 4 MB are counted whole; larger ones from pieces, as calibration reads them
TEMPERATURE = 1.0
TOP_P = 0.95

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
# Control bytes plain text does not use (tab, newlines, form feed and escape are allowed).
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\x1b") + b"\x7f"
_SNIFF_SIZE = 65536  # bytes or characters looked at to guess what a file holds
# Bytes of file read per token needed: text takes 3-5 bytes a token; the rest covers markup the
# parsers drop (JSON keys, CSV columns) and windows lost at sample boundaries.
BYTES_PER_TOKEN = 16
SAMPLE_PIECES = 64  # a file larger than needed is read in this many pieces spread over it
JSON_WHOLE_LIMIT = 64 * 2**20  # .json cannot be sampled in pieces; larger ones are refused
_JSON_LIST_KEYS = ("data", "samples", "texts")
_EXPECTED_RECORD = (
    'an object with "text", or "prompt" (and optionally "completion" or "response"), '
    'or chat "messages" (a list of {"role", "content"})'
)


def check_text_file(path: Path) -> Path:
    """`path` if it names a file of a readable kind, without reading it (cheap enough for every keystroke)."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"Text file not found: {path}. Check the path, or choose another file.")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder; choose a text file inside it.")
    if path.suffix.lower() not in _PARSERS:
        raise WorkbenchError(
            f"{path.name}: text files must end in {', '.join(SUPPORTED_EXTENSIONS)}; "
            "save the text in one of these formats."
        )
    return path


def read_texts(path: Path, tokens: int | None = None, *, across: bool = True) -> list[str]:
    """The calibration samples in a .txt, .jsonl, .csv or .json file, empty ones dropped.

    .txt: paragraphs separated by blank lines. .jsonl: one object per line with "text", or
    "prompt" (+ "completion"/"response"), or chat "messages". .csv: the `text` column, or the
    only column holding text; the first row is the header. .json: a list of strings or of such
    objects, possibly under "data", "samples" or "texts".

    With `tokens`, about enough text for that many tokens is kept, sampled across the whole file:
    a file larger than that is read in pieces at evenly spaced offsets, never whole, so a file of
    gigabytes costs no more memory than one of a few hundred kilobytes. `across=False` keeps the
    file's start instead (one contiguous text, as quality measurements read it).
    """
    path = check_text_file(path)
    suffix = path.suffix.lower()
    parse = _PARSERS[suffix]
    budget = None if tokens is None else _budget(tokens)
    size = _size(path)
    if is_sampled(path, tokens):
        text = _sampled(path, size, budget, suffix, SAMPLE_PIECES if across else 1)
    else:
        if suffix == ".json" and budget is not None and size > JSON_WHOLE_LIMIT:
            raise WorkbenchError(
                f"{path.name} is {format_size(size)}; a .json file can only be read whole, which at this size "
                "takes too much memory. Save the samples as .jsonl (one per line): the workbench then reads "
                "only the parts it needs."
            )
        text = _decode(path)
    if not text.strip():
        raise WorkbenchError(f"{path.name} is empty; choose a file with some text in it.")
    texts = [t for t in (t.strip() for t in parse(text, path.name)) if t]
    if not texts:
        raise WorkbenchError(f"No text found in {path.name}; check that it holds the samples you meant.")
    if budget is not None and across:
        texts = _spread(texts, budget)
    logger.info("read %d calibration samples from %s", len(texts), path)
    return texts


def is_sampled(path: Path, tokens: int | None) -> bool:
    """Whether `read_texts(path, tokens)` reads only pieces of the file (it is larger than needed)."""
    return tokens is not None and path.suffix.lower() != ".json" and _size(path) > _budget(tokens)


def _budget(tokens: int) -> int:
    return max(tokens * BYTES_PER_TOKEN, _SNIFF_SIZE)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as error:
        raise WorkbenchError(
            f"Cannot read {path}: {error.strerror or error}. Check that the file is readable and try again."
        ) from None


def _sampled(path: Path, size: int, budget: int, suffix: str, pieces: int) -> str:
    """About `budget` bytes of `path` as text: `pieces` pieces at evenly spaced offsets, each
    trimmed to whole records (lines; for .txt, lines or words), joined as separate records."""
    piece = budget // pieces
    boundaries = (b"\n", b" ") if suffix == ".txt" else (b"\n",)
    joiner = "\n\n" if suffix == ".txt" else "\n"
    texts = []
    with path.open("rb") as handle:
        for index in range(pieces):
            start = index * size // pieces
            handle.seek(start)
            data = handle.read(piece)
            if index == 0:
                _check_not_binary(data, path.name)
            elif start:  # resync: drop the record cut by the offset
                data = _after_boundary(data, boundaries)
            if start + piece < size:  # and the one cut by the piece's end
                data = _before_boundary(data, boundaries)
            if data:
                texts.append(_decode_bytes(data, path.name, start))
    logger.info("sampled %d pieces of %s (%d bytes) across %s", len(texts), path.name, size, path)
    return joiner.join(texts)


def _after_boundary(data: bytes, boundaries: tuple[bytes, ...]) -> bytes:
    for boundary in boundaries:
        cut = data.find(boundary)
        if cut >= 0:
            return data[cut + len(boundary):]
    return b""


def _before_boundary(data: bytes, boundaries: tuple[bytes, ...]) -> bytes:
    for boundary in boundaries:
        cut = data.rfind(boundary)
        if cut >= 0:
            return data[:cut]
    return b""


def _spread(texts: list[str], budget: int) -> list[str]:
    """Samples evenly spaced over `texts`, about `budget` characters in all (in their order)."""
    total = sum(len(t) for t in texts)
    if total <= budget:
        return texts
    keep = max(1, len(texts) * budget // total)
    return [texts[i * len(texts) // keep] for i in range(keep)]


@dataclass(frozen=True)
class CalibrationPreview:
    """What the GUI shows about a calibration file before it is used."""

    path: Path
    format: str  # "txt", "jsonl", "csv" or "json"
    samples: int
    characters: int
    tokens: int | None  # None when no tokenizer was given
    first_samples: tuple[str, ...]  # the first few, each cut to about PREVIEW_CHARACTERS
    sampled: bool = False  # the file is too large to read whole: the counts are of pieces read across it


def preview(path: Path, tokenizer: Any = None) -> CalibrationPreview:
    """Read `path` and summarize it; tokens are counted with `tokenizer` when one is given."""
    path = Path(path)
    texts = read_texts(path, tokens=PREVIEW_TOKENS)
    tokens = None
    if tokenizer is not None:
        tokens = sum(len(ids) for ids in _encode(tokenizer, texts))
    return CalibrationPreview(
        path=path,
        format=path.suffix.lower().lstrip("."),
        samples=len(texts),
        characters=sum(len(t) for t in texts),
        tokens=tokens,
        first_samples=tuple(_shorten(t, PREVIEW_CHARACTERS) for t in texts[:PREVIEW_SAMPLES]),
        sampled=is_sampled(path, PREVIEW_TOKENS),
    )


def file_samples(path: Path, tokenizer: Any, settings: QuantSettings, progress: Progress = no_progress) -> np.ndarray:
    """The token samples `settings` ask for, from a calibration file read only as far as they need."""
    progress(0.0, f"reading {Path(path).name}")
    texts = read_texts(Path(path), tokens=settings.calibration_token_count)
    return token_samples(texts, tokenizer, settings.samples, settings.calibration_tokens)


def token_samples(texts: list[str], tokenizer: Any, n_samples: int, seq_len: int) -> np.ndarray:
    """Up to `n_samples` windows of `seq_len` tokens, (n, seq_len) int64.

    The texts are tokenized without special tokens and joined with the tokenizer's EOS between
    them (a document boundary, as in pretraining), then cut into consecutive windows. When there
    are more windows than wanted, the chosen ones are spread evenly over the whole text so that a
    file sorted by topic is still sampled across topics.
    """
    _check_sizes(n_samples, seq_len)
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    stream: list[int] = []
    for index, ids in enumerate(_encode(tokenizer, texts)):
        if index:
            stream.extend(separator)
        stream.extend(ids)
    available = len(stream) // seq_len
    if available == 0:
        raise WorkbenchError(
            f"The calibration text has {len(stream)} tokens, but one sample needs {seq_len}; "
            "add more text or lower the calibration tokens per sample."
        )
    windows = np.asarray(stream[: available * seq_len], dtype=np.int64).reshape(available, seq_len)
    if available > n_samples:
        windows = windows[np.arange(n_samples) * available // n_samples]
    else:
        logger.info("calibration text gives %d windows of %d tokens (%d asked)", available, seq_len, n_samples)
    return windows


def self_written_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    *,
    seed: int = 0,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> np.ndarray:
    """Data-free calibration: (n_samples, seq_len) int64 tokens the model wrote itself.

    Each sample starts with BOS (when the model has one) and then one token drawn uniformly from
    the ordinary vocabulary: with the same start, samples at temperature 1 still tend to open the
    same way, and a random first token spreads them over topics (as in LLM-QAT). The rest is
    sampled with temperature 1.0 and top-p 0.95, all samples in one batch with the KV cache.
    The same seed gives the same tokens on the same machine.
    """
    import torch

    _check_sizes(n_samples, seq_len)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise WorkbenchError(
            f"The model handles at most {max_positions} tokens at once; "
            f"lower the calibration tokens per sample from {seq_len}."
        )
    generator = torch.Generator().manual_seed(seed)
    # The embedding table may have padding rows past the tokenizer's ids; those are never drawn.
    vocab_size = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    first = ordinary[torch.randint(len(ordinary), (n_samples,), generator=generator)]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else model.config.bos_token_id
    start = first[:, None] if bos is None else torch.stack([torch.full_like(first, bos), first], dim=1)
    start = start[:, :seq_len]

    tokens = torch.empty((n_samples, seq_len), dtype=torch.long)
    tokens[:, : start.shape[1]] = start
    device = next(model.parameters()).device
    with evaluating(model):
        check(cancelled)
        inputs = start.to(device)
        past = None
        for position in range(start.shape[1], seq_len):
            output = model(input_ids=inputs, past_key_values=past, use_cache=True)
            past = output.past_key_values
            # Sampling on the CPU with a CPU generator keeps one seed's output the same on any device.
            logits = output.logits[:, -1, :vocab_size].float().cpu()
            tokens[:, position] = _sample_top_p(logits, generator)
            inputs = tokens[:, position : position + 1].to(device)
            check(cancelled)
            progress((position + 1) / seq_len, f"the model writes its example text: token {position + 1} of {seq_len}")
    progress(1.0, f"the model wrote {n_samples} samples of {seq_len} tokens")
    return tokens.numpy()


def _sample_top_p(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row, drawn from the nucleus: the tokens whose more likely rivals hold less
    than TOP_P of the probability, renormalized.

    Sorting and `multinomial` over the whole vocabulary cost more than the model's own step on
    a CPU, and a small model's nucleus often spans thousands of tokens. So this draws from the
    full distribution (inverse CDF) and redraws the rows whose token fell outside the nucleus:
    the result follows the same distribution, and a redraw is needed at most 1 - TOP_P of the time.
    """
    import torch

    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    tokens = torch.empty(len(probs), dtype=torch.long)
    pending = torch.arange(len(probs))
    while len(pending):
        row_cdf = cdf[pending]
        target = torch.rand(len(pending), 1, dtype=torch.float64, generator=generator) * row_cdf[:, -1:]
        drawn = torch.searchsorted(row_cdf, target, side="right").squeeze(1).clamp_(max=probs.shape[-1] - 1)
        row_probs = probs[pending]
        drawn_prob = row_probs.gather(1, drawn[:, None])
        mass_above = (row_probs * (row_probs > drawn_prob)).sum(dim=-1)
        inside = mass_above < TOP_P
        tokens[pending[inside]] = drawn[inside]
        pending = pending[~inside]
    return tokens


def _check_sizes(n_samples: int, seq_len: int) -> None:
    if n_samples < 1 or seq_len < 1:
        raise WorkbenchError(
            f"Calibration needs at least 1 sample of at least 1 token (asked: {n_samples} samples "
            f"of {seq_len} tokens); raise these settings."
        )


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def _decode(path: Path) -> str:
    """The file's text, refusing binary files and explaining encoding errors."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WorkbenchError(
            f"Cannot read {path}: {error.strerror or error}. Check that the file is readable and try again."
        ) from None
    _check_not_binary(data, path.name)
    return _decode_bytes(data, path.name, 0)


def _check_not_binary(data: bytes, name: str) -> None:
    """`data`: the file's first bytes."""
    if data.startswith(_UTF16_BOMS):
        raise WorkbenchError(
            f"{name} is saved as UTF-16, so it looks like a binary file here; save it as UTF-8 and try again."
        )
    if _looks_binary(data[:_SNIFF_SIZE]):
        raise WorkbenchError(
            f"{name} looks like a binary file, not text; choose a text file ({', '.join(SUPPORTED_EXTENSIONS)})."
        )


def _decode_bytes(data: bytes, name: str, start: int) -> str:
    """`data`, read from offset `start` of the file `name`, as text."""
    skipped = len(_UTF8_BOM) if start == 0 and data.startswith(_UTF8_BOM) else 0
    try:
        return data[skipped:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = skipped + error.start
        newlines = data.count(b"\n", 0, offset)
        where = f"line {newlines + 1}" if start == 0 else "in a part of the file read as a sample"
        raise WorkbenchError(
            f"{name} is not UTF-8 text: the byte at offset {start + offset} ({where}) is 0x{data[offset]:02x}. "
            "Save the file as UTF-8 (in most editors: Save As, encoding UTF-8) and try again."
        ) from None


def _looks_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    # Random or compressed bytes are about 12 % control bytes; text has next to none.
    return len(sample.translate(None, delete=_CONTROL_BYTES)) < 0.95 * len(sample)


def _parse_txt(text: str, name: str) -> list[str]:
    return re.split(r"\n\s*\n", text.replace("\r\n", "\n").replace("\r", "\n"))


def jsonl_records(text: str, name: str, expected: str) -> list[tuple[int, object]]:
    """(line number, value) of every non-empty line of a JSON Lines text; a line that is not JSON is
    refused with a message saying what each line should be (`expected`)."""
    records = []
    # Not splitlines(): it also splits on U+2028 and friends, which may sit inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise WorkbenchError(
                f"{name}, line {number}: not valid JSON ({error.msg}). Each line should be {expected}."
            ) from None
    return records


def _parse_jsonl(text: str, name: str) -> list[str]:
    texts = []
    for number, record in jsonl_records(text, name, _EXPECTED_RECORD):
        sample = _record_text(record)
        if sample is None:
            raise WorkbenchError(
                f"{name}, line {number}: found {_describe(record)}. Each line should be {_EXPECTED_RECORD}."
            )
        texts.append(sample)
    return texts


def _parse_json(text: str, name: str) -> list[str]:
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise WorkbenchError(
            f"{name} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. "
            "Fix the file, or save one sample per line as .jsonl or .txt."
        ) from None
    if isinstance(content, dict):
        content = next((content[key] for key in _JSON_LIST_KEYS if isinstance(content.get(key), list)), content)
    if not isinstance(content, list):
        raise WorkbenchError(
            f"{name}: expected a list of strings or of objects ({_EXPECTED_RECORD}), or an object with "
            f"such a list under {' or '.join(repr(k) for k in _JSON_LIST_KEYS)}; found {_describe(content)}."
        )
    texts = []
    for number, item in enumerate(content, start=1):
        sample = item if isinstance(item, str) else _record_text(item)
        if sample is None:
            raise WorkbenchError(
                f"{name}, item {number} of the list: found {_describe(item)}. "
                f"Each item should be a string or {_EXPECTED_RECORD}."
            )
        texts.append(sample)
    return texts


def _parse_csv(text: str, name: str) -> list[str]:
    # Only the delimiter is sniffed: the sniffer's quoting guesses are unreliable (it turns off
    # doubled quotes when the sample has none), and standard CSV quoting is what tools write.
    try:
        delimiter = csv.Sniffer().sniff(text[:_SNIFF_SIZE], delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[list[str]] = []
    row_start = 1
    try:
        for row in reader:
            rows.append(row)
            row_start = reader.line_num + 1
    except csv.Error as error:
        # The usual cause is an unclosed quote that swallowed the lines after it: name where it began.
        raise WorkbenchError(
            f"{name}, line {row_start}: cannot read the row starting there as CSV ({error}). "
            "Check its quotes: a field with commas or line breaks needs them on both sides."
        ) from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    header = [column.strip() for column in rows[0]]
    rows = rows[1:]
    column = _text_column(header, rows)
    if column is None:
        raise WorkbenchError(
            f"{name}: cannot tell which column holds the samples; found columns "
            f'{", ".join(repr(c) for c in header)}. Add a column named "text" (or rename the one '
            "with the samples) and try again."
        )
    return [row[column] for row in rows if column < len(row)]


def _text_column(header: list[str], rows: list[list[str]]) -> int | None:
    """The column named `text`, else the only column holding anything but numbers."""
    named = [i for i, column in enumerate(header) if column.lower() == "text"]
    if len(named) == 1:
        return named[0]
    texty = [i for i in range(len(header)) if any(i < len(row) and _is_words(row[i]) for row in rows)]
    return texty[0] if len(texty) == 1 and not named else None


def _is_words(value: str) -> bool:
    value = value.strip()
    if not value:
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def _record_text(record: object) -> str | None:
    """The text of one jsonl/json record, or None when it has none of the expected keys."""
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("prompt"), str):
        answers = [record[k] for k in ("completion", "response") if isinstance(record.get(k), str)]
        return "\n".join([record["prompt"], *answers])
    messages = record.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return "\n".join(_message_text(m.get("content")) for m in messages)
    return None


def _message_text(content: object) -> str:
    # Besides a plain string, chat APIs send content as a list of parts like {"type": "text", "text": ...}.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def _describe(value: object) -> str:
    """A short description of a JSON value for error messages."""
    if isinstance(value, dict):
        return f"an object with keys {', '.join(repr(k) for k in list(value)[:8])}" if value else "an empty object"
    return json.dumps(value, ensure_ascii=False)[:60]


_PARSERS = {".txt": _parse_txt, ".jsonl": _parse_jsonl, ".csv": _parse_csv, ".json": _parse_json}
