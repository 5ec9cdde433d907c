"""INT4 settings: one frozen dataclass, three presets, JSON with a type tag and a version."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

from workbench.errors import WorkbenchError
from workbench.quantization.methods import METHODS as METHOD_TABLE
from workbench.quality.verdict import PresetBenchmark

METHODS = tuple(METHOD_TABLE)
SETTINGS_VERSION = 1
MAX_SENSITIVE_8BIT_PCT = 100.0  # all 8 bits costs about 90 % more than all 4 bits
CALIBRATION_SAMPLES = 32  # the samples of a calibration file, and of data-free text from 1 B parameters up
# Data-free text costs only time, which grows with samples x parameters: a model below this size writes more
# samples (up to MAX_SAMPLES_FACTOR times as many) for about the work of 32 at this size. On the demo model
# 128 samples instead of 32 took about 1.5 points off the balanced preset's loss (docs/quality.md).
CALIBRATION_WORK_PARAMETERS = 10**9
MAX_SAMPLES_FACTOR = 4


@dataclass(frozen=True)
class QuantSettings:
    """How to turn the fp32 ONNX model into INT4.

    Layer names are the model's module names (`model.layers.0.mlp.down_proj`, `lm_head`);
    `eight_bit` and `exclude` take shell-style patterns over them. `sensitive_8bit_pct` keeps the
    layers measured most sensitive at 8 bits too, adding at most that percentage to the size.
    """

    method: str = "rtn"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    quantize_embeddings: bool = True
    quantize_lm_head: bool = True
    eight_bit: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    act_order: bool = False
    calibration_samples: int | None = None  # None: as many as `for_model` chooses for the model
    calibration_tokens: int = 256
    # A later addition with a default that means "off", so version 1 records still read as before.
    sensitive_8bit_pct: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WorkbenchError(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise WorkbenchError(
                f"Block size {self.block_size} is not supported; use 16, 32, 64, 128 or 256 "
                "(smaller blocks: better quality, bigger file)."
            )
        if not 0 <= self.accuracy_level <= 4:
            raise WorkbenchError(f"Accuracy level must be 0 to 4, not {self.accuracy_level}.")
        if (self.calibration_samples is not None and self.calibration_samples < 1) or self.calibration_tokens < 16:
            raise WorkbenchError("Calibration needs at least 1 sample of at least 16 tokens.")
        if not 0 <= self.sensitive_8bit_pct <= MAX_SENSITIVE_8BIT_PCT:
            raise WorkbenchError(
                f"The size allowed for sensitive 8-bit layers must be 0 to {MAX_SENSITIVE_8BIT_PCT:g} % of the "
                f"INT4 size, not {self.sensitive_8bit_pct:g}; 0 turns it off."
            )

    @property
    def needs_calibration(self) -> bool:
        """Calibrated methods, and the sensitivity measurement, read calibration samples."""
        return METHOD_TABLE[self.method].calibrated or self.sensitive_8bit_pct > 0

    @property
    def samples(self) -> int:
        """Calibration samples: those asked for, else the count for a file (settings not yet `for_model`)."""
        return self.calibration_samples or CALIBRATION_SAMPLES

    @property
    def calibration_token_count(self) -> int:
        """Tokens of calibration text the samples take, all together."""
        return self.samples * self.calibration_tokens

    def for_model(self, parameters: int, reads_file: bool) -> QuantSettings:
        """These settings for a model of `parameters`, with the calibration samples counted (see
        CALIBRATION_WORK_PARAMETERS); settings that name their count are kept as they are. `reads_file`: a
        calibration file is given (a method that reads none ignores it)."""
        if self.calibration_samples is not None:
            return self
        data_free = not (reads_file and self.needs_calibration)
        factor = 1
        while data_free and factor < MAX_SAMPLES_FACTOR and 2 * factor * parameters <= CALIBRATION_WORK_PARAMETERS:
            factor *= 2
        return self.replace(calibration_samples=CALIBRATION_SAMPLES * factor)

    def bits_for(self, layer: str) -> int | None:
        """4 or 8 for a layer name, None when it stays fp32."""
        if any(fnmatch.fnmatchcase(layer, p) for p in self.exclude):
            return None
        if any(fnmatch.fnmatchcase(layer, p) for p in self.eight_bit):
            return 8
        return 4

    def check_patterns(self, layers: list[str]) -> None:
        """Refuse an `eight_bit` or `exclude` pattern that matches none of these layer names: a typo
        would otherwise quietly give a different model than the one asked for."""
        for option, patterns in (("--eight-bit", self.eight_bit), ("--exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(layer, pattern) for layer in layers):
                    # The first block's names show the pattern of all the others.
                    sample = [n for n in layers if ".layers." not in n or ".layers.0." in n]
                    raise WorkbenchError(
                        f"The layer pattern {pattern!r} ({option}) matches no layer of this model. Its "
                        f"{len(layers)} layers are named like: {', '.join(sample)} (and the same for each block: "
                        "model.layers.1.*, ...). Correct the pattern (shell wildcards: *, ?)."
                    )

    def replace(self, **changes) -> QuantSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["eight_bit"] = list(self.eight_bit)
        data["exclude"] = list(self.exclude)
        return {"type": "QuantSettings", "version": SETTINGS_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict) -> QuantSettings:
        if data.get("type") != "QuantSettings" or data.get("version") != SETTINGS_VERSION:
            raise WorkbenchError(
                f"These settings were written by another version of the workbench "
                f"(type {data.get('type')!r}, version {data.get('version')!r}); re-create them here."
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["eight_bit"] = tuple(values.get("eight_bit", ()))
        values["exclude"] = tuple(values.get("exclude", ()))
        return cls(**values)


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    description: str
    benchmark: PresetBenchmark  # what it cost where it was measured
    settings: QuantSettings = field(default_factory=QuantSettings)

    @property
    def quality_cost(self) -> str:
        """The expected cost in plain words and the measured number, for the preset cards."""
        return self.benchmark.promise()


# Chosen on a development text (the last 80 kB of tinyshakespeare): balanced and smallest with the
# off-grid reference; quality's sensitive layers beat fixed 8-bit down projections there in the demo
# model's tune run. Measured on held-out texts by `make bench` (docs/quality.md); with the 128 samples a model this
# small writes (2026-12-03): balanced's figure the mean of twelve calibration seeds, the others' one seed.
# The off-grid reference (docs/quality.md): the demo model's function, its weights not on a 4-bit grid.
BENCHMARK_MODEL = "SmolLM2-135M with weights not rounded before"
BENCHMARK_TEXT = "held-out Shakespeare"  # docs/quality.md: the figures are the tinyshakespeare column
PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "balanced",
            "Balanced",
            "About six times smaller than the original: calibrated 4-bit weights everywhere.",
            PresetBenchmark(8.9, BENCHMARK_MODEL, BENCHMARK_TEXT),
            QuantSettings(method="gptq", block_size=32, symmetric=False, act_order=True),
        ),
        Preset(
            "smallest",
            "Smallest",
            "About seven times smaller, for machines short of memory; answers drift the most.",
            PresetBenchmark(10.6, BENCHMARK_MODEL, BENCHMARK_TEXT),
            QuantSettings(method="gptq", block_size=64, symmetric=False, act_order=True),
        ),
        Preset(
            "quality",
            "Best quality",
            "Keeps the layers most sensitive to rounding at 8 bits (found by measuring the model, for at "
            "most 13\u00a0% more size): closest to the original, about five times smaller.",
            PresetBenchmark(5.2, BENCHMARK_MODEL, BENCHMARK_TEXT),
            QuantSettings(method="gptq", block_size=32, symmetric=False, act_order=True, sensitive_8bit_pct=13.0),
        ),
    )
}
DEFAULT_PRESET = "balanced"


def preset_settings(name: str) -> QuantSettings:
    try:
        return PRESETS[name].settings
    except KeyError:
        raise WorkbenchError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None
