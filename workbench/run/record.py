"""The run record (run.json) as typed, frozen dataclasses: what a run was made from, how, and what it measured.

`RunRecord.from_dict` reads what `to_dict` writes; both keep run.json's keys and their order, so a
record read and saved again is the same file. Keys this version does not know (written by a later
one) are kept in `extra` and written back. The file itself is read and written by
workbench.run.folders (load_run, save_run); workbench.run.wording turns a record into sentences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import WorkbenchError
from workbench.layout import INT4, ORIGINAL
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo

RUN_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class QualityResult:
    """INT4 against the original on one text (the `quality` entries of run.json)."""

    text: str  # file name of the text
    tokens: int  # scored positions
    window: int
    original_perplexity: float | None  # this and the comparisons below: None when the original was skipped
    int4_perplexity: float
    perplexity_increase_pct: float | None
    top1_agreement: float | None
    mean_kl: float | None

    @property
    def compared(self) -> bool:
        """Whether the original was measured too (not where the run's original was skipped)."""
        return self.original_perplexity is not None

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "window": self.window,
            "original": {"perplexity": self.original_perplexity},
            "int4": {"perplexity": self.int4_perplexity},
            "perplexity_increase_pct": self.perplexity_increase_pct,
            "top1_agreement": self.top1_agreement,
            "mean_kl": self.mean_kl,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QualityResult:
        flat = {k: v for k, v in data.items() if k not in ("original", "int4")}
        return cls(
            **flat,
            original_perplexity=data["original"]["perplexity"],
            int4_perplexity=data["int4"]["perplexity"],
        )


@dataclass(frozen=True)
class RunSource:
    """What the user asked for (`spec`) and where it was found."""

    spec: str
    kind: str  # demo | folder | gguf | hub
    name: str
    path: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FILE_STRUCTURE = "graph and padding"  # the part of a model's files that is not tensors


@dataclass(frozen=True)
class ModelFigures:
    """One model of the run (original or INT4) as measured: sizes per component, peak RAM of a session."""

    bytes: int  # graph and weights (for a skipped original: from the weight shapes)
    components: dict[str, int]  # on disk
    ram_components: dict[str, int]
    peak_rss_bytes: int | None  # None when the model was not run (`skipped`)
    skipped: str | None = None  # why the original was not written here (too large to run on this machine)

    @property
    def disk_parts(self) -> dict[str, int]:
        """The size on disk per component, adding up to `bytes` (the files as measured): the components
        count the tensors only, so the graph itself and the files' padding are one more part."""
        rest = self.bytes - sum(self.components.values())
        return {**self.components, FILE_STRUCTURE: rest} if rest > 0 else dict(self.components)

    def to_dict(self) -> dict:
        data = {"bytes": self.bytes, "components": self.components, "ram_components": self.ram_components,
                "peak_rss_bytes": self.peak_rss_bytes}
        if self.skipped is not None:
            data["skipped"] = self.skipped
        return data


@dataclass(frozen=True)
class Speed:
    """`int4-workbench bench`'s figures; `original`/`int4` hold tokens_per_s, ttft_s, load_rss_bytes, peak_rss_bytes."""

    provider: str
    provider_reason: str
    rounds: int
    new_tokens: int
    prompt_tokens: int
    original: dict | None  # None when the run's original was skipped
    int4: dict
    speedup: float | None
    memory_ratio: float | None
    machine: dict | None = None  # where it was measured

    def to_dict(self) -> dict:
        data = {"provider": self.provider, "provider_reason": self.provider_reason, "rounds": self.rounds,
                "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens, ORIGINAL: self.original,
                INT4: self.int4, "speedup": self.speedup, "memory_ratio": self.memory_ratio}
        if self.machine is not None:
            data["machine"] = self.machine
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Speed:
        return cls(**data)


DATA_FREE = "self-written (data-free)"  # `calibration` of a run whose model wrote its own calibration text


@dataclass(frozen=True)
class RunRecord:
    """run.json. `sensitivity` and `tune` are the sections written by workbench.quantization.sensitivity
    and workbench.run.tune (their own keys); `run_dir` is where the record was read or written, not saved."""

    created: str
    source: RunSource
    model: ModelInfo
    preset: str | None
    settings: QuantSettings
    calibration: str | None
    original: ModelFigures
    int4: ModelFigures
    size_ratio: float
    ram_ratio: float | None  # None when the original was skipped
    bits_per_weight: float
    graph: dict  # attention fusion: {"attention": ..., "reason" or "nodes"}
    int4_layers: dict[str, int | None]  # bits per layer, None = kept fp32
    shared_embeddings: bool
    ops: dict[str, int]  # operator counts of the INT4 graph as written
    timings_s: dict[str, float]
    quality: tuple[QualityResult, ...]
    machine: dict
    versions: dict[str, str]
    sensitivity: dict | None = None
    tune: dict | None = None
    speed: Speed | None = None
    schema_version: int = RUN_SCHEMA_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    run_dir: str | None = None

    def figures(self, key: str) -> ModelFigures:
        """The original's or the INT4 model's figures, by folder name."""
        return {ORIGINAL: self.original, INT4: self.int4}[key]

    def kept(self, settings: QuantSettings) -> bool:
        """Whether this run used `settings` (a preset's), its calibration samples counted for this model."""
        reads_file = self.calibration not in (None, DATA_FREE)  # None: the method read no calibration text
        return self.settings in (settings, settings.for_model(self.model.parameters, reads_file=reads_file))

    def replace(self, **changes) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def with_quality(self, result: QualityResult) -> RunRecord:
        """This record with `result` as the quality on its text (one entry per text, the newest last)."""
        kept = tuple(q for q in self.quality if q.text != result.text)
        return self.replace(quality=(*kept, result))

    def to_dict(self) -> dict:
        data = {
            "schema_version": self.schema_version,
            "created": self.created,
            "source": self.source.to_dict(),
            "model": self.model.to_dict(),
            "preset": self.preset,
            "settings": self.settings.to_dict(),
            "calibration": self.calibration,
            ORIGINAL: self.original.to_dict(),
            INT4: self.int4.to_dict(),
            "size_ratio": self.size_ratio,
            "ram_ratio": self.ram_ratio,
            "bits_per_weight": self.bits_per_weight,
            "graph": self.graph,
            "int4_layers": self.int4_layers,
            "shared_embeddings": self.shared_embeddings,
            "ops": self.ops,
            "timings_s": self.timings_s,
            "quality": [q.to_dict() for q in self.quality],
            "machine": self.machine,
            "versions": self.versions,
        }
        for key in ("sensitivity", "tune"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.speed is not None:
            data["speed"] = self.speed.to_dict()
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict, run_dir: str | None = None) -> RunRecord:
        """Read a run.json of schema version 1 (written by every version so far)."""
        if data.get("schema_version") != RUN_SCHEMA_VERSION:
            raise ValueError(f"run record of schema version {data.get('schema_version')!r}; load_run checks it")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "run_dir"}
        try:
            return cls(
                schema_version=data["schema_version"],
                created=data["created"],
                source=RunSource(**data["source"]),
                model=ModelInfo.from_dict(data["model"]),
                preset=data["preset"],
                settings=QuantSettings.from_dict(data["settings"]),
                calibration=data["calibration"],
                original=ModelFigures(**data[ORIGINAL]),
                int4=ModelFigures(**data[INT4]),
                size_ratio=data["size_ratio"],
                ram_ratio=data["ram_ratio"],
                bits_per_weight=data["bits_per_weight"],
                graph=data["graph"],
                int4_layers=data["int4_layers"],
                shared_embeddings=data["shared_embeddings"],
                ops=data["ops"],
                timings_s=data["timings_s"],
                quality=tuple(QualityResult.from_dict(q) for q in data["quality"]),
                machine=data["machine"],
                versions=data["versions"],
                sensitivity=data.get("sensitivity"),
                tune=data.get("tune"),
                speed=Speed.from_dict(data["speed"]) if data.get("speed") is not None else None,
                extra={k: v for k, v in data.items() if k not in known},
                run_dir=run_dir,
            )
        except (KeyError, TypeError) as error:
            raise WorkbenchError(
                f"The run record lacks or garbles {error}; it was not written by a finished `quantize`. "
                "Quantize the model again."
            ) from error
