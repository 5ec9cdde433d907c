"""Quality and size benchmark on the off-grid reference (`make bench`).

The demo model's weights lie on a 4-bit grid, so its quality figures flatter every method. This
builds (once, cached) the same model in a randomly rotated basis, quantizes it with each preset,
the anchor settings and single changes from the balanced preset, and measures perplexity, top-1
agreement and KL on two texts used neither for calibration (data-free, except for the candidate
calibrated on the development text) nor for choosing the presets' settings (the development text
is the end of tinyshakespeare): the start of ../shared/data/tinyshakespeare.txt and
benchmarks/data/sqlite_essays.txt, and each candidate's decode speed. Results go to
bench-results/quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from workbench.generation.bench import bench_run
from workbench.quality.evaluate import evaluate
from workbench.quality.offgrid import build_offgrid_reference
from workbench.run.pipeline import quantize_run
from workbench.settings import PRESETS, QuantSettings
from workbench.sources import cache_dir, demo_folder, resolve, weights_folder
from workbench.units import format_size

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {
    "tinyshakespeare": ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
    "sqlite_essays": ROOT / "benchmarks" / "data" / "sqlite_essays.txt",
}
DEV_TEXT_BYTES = 80_000  # the end of tinyshakespeare: used to choose the presets, and as real calibration text


@dataclass(frozen=True)
class Candidate:
    settings: QuantSettings
    preset: str | None = None
    real_calibration: bool = False  # calibrated on the dev text instead of the model's own text


BALANCED = PRESETS["balanced"].settings
CANDIDATES = {
    **{f"preset-{name}": Candidate(preset.settings, name) for name, preset in PRESETS.items()},
    # the anchors of the issue: plain rounding and HQQ
    "rtn-sym-b32": Candidate(QuantSettings(method="rtn", block_size=32, symmetric=True)),
    "rtn-asym-b32": Candidate(QuantSettings(method="rtn", block_size=32, symmetric=False)),
    "hqq-b32": Candidate(QuantSettings(method="hqq", block_size=32, symmetric=False)),
    # one change at a time from the balanced preset; 13 %: the quality preset's 8-bit down projections' size
    "balanced-sensitive-13": Candidate(replace(BALANCED, sensitive_8bit_pct=13.0)),
    "balanced-sensitive-5": Candidate(replace(BALANCED, sensitive_8bit_pct=5.0)),
    "awq-b32": Candidate(QuantSettings(method="awq", block_size=32, symmetric=False)),
    "gptq-b32-no-act-order": Candidate(replace(BALANCED, act_order=False)),
    "gptq-b128-act": Candidate(replace(BALANCED, block_size=128)),
    "balanced-accuracy-0": Candidate(replace(BALANCED, accuracy_level=0)),
    "balanced-real-calibration": Candidate(BALANCED, real_calibration=True),
}
QUANTIZE_STAGES = ("calibration", "gptq", "awq", "int4")  # what a candidate costs beyond the shared export
log = logging.getLogger("bench")


def reference_folder() -> Path:
    folder = cache_dir() / "offgrid" / "smollm2-135m-rotated-seed0"
    if not (folder / "config.json").is_file():
        log.info("building the off-grid reference in %s", folder)
        build_offgrid_reference(weights_folder(demo_folder()), folder, seed=0)
    return folder


def dev_text(out: Path) -> Path:
    """The presets' development text, also the real calibration file: never scored here."""
    path = out / "dev_text.txt"
    source = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    path.write_bytes(source.read_bytes()[-DEV_TEXT_BYTES:])
    return path


def measure(name: str, model: str, candidate: Candidate, out: Path, args) -> dict:
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    calibration = dev_text(out) if candidate.real_calibration else None
    record = quantize_run(model, run_dir, candidate.settings, calibration=calibration, preset=candidate.preset)
    row = {
        "name": name,
        "settings": candidate.settings.to_dict(),
        "calibration": record.calibration,
        "int4_bytes": record.int4.bytes,
        "original_bytes": record.original.bytes,
        "size_ratio": record.size_ratio,
        "bits_per_weight": record.bits_per_weight,
        "timings_s": record.timings_s,
        "wall_s": round(time.perf_counter() - began, 1),
        "quality": {},
    }
    for text, path in TEXTS.items():
        if not path.is_file():
            log.warning("%s is missing; skipping it", path)
            continue
        result = evaluate(run_dir / "original", run_dir / "int4", path, max_tokens=args.tokens)
        row["quality"][text] = result.to_dict()
    if args.speed:
        speed = bench_run(run_dir, rounds=1, new_tokens=64, prompt_tokens=128)
        row["speed"] = {"int4_tokens_per_s": speed["int4"]["tokens_per_s"], "speedup": speed["speedup"]}
    log.info("%s: %s", name, json.dumps({k: row[k] for k in ("size_ratio", "wall_s")} | {
        t: q["perplexity_increase_pct"] for t, q in row["quality"].items()}))
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def markdown(rows: list[dict]) -> str:
    texts = list(TEXTS)
    header = "| candidate | size | x smaller | bits/weight | " + " | ".join(
        f"{t} ppl +% | {t} top-1" for t in texts) + " | int4 tok/s (x original) | quantize s |"
    lines = [header, "|" + "---|" * (6 + 2 * len(texts))]
    for row in rows:
        cells = [row["name"], format_size(row["int4_bytes"]), f"{row['size_ratio']:.2f}",
                 f"{row['bits_per_weight']:.2f}"]
        for text in texts:
            quality = row["quality"].get(text)
            cells += [f"{quality['perplexity_increase_pct']:+.1f}", f"{quality['top1_agreement'] * 100:.1f} %"] if quality else ["-", "-"]
        speed = row.get("speed")
        cells.append(f"{speed['int4_tokens_per_s']:.1f} ({speed['speedup']:.2f}x)" if speed else "-")
        timings = row["timings_s"]
        cells.append(f"{sum(timings.get(stage, 0) for stage in QUANTIZE_STAGES):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="offgrid", help="'offgrid' (default), 'demo', or any model spec")
    parser.add_argument("--only", nargs="*", help="candidate names to run (presets and anchors)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens scored per text")
    parser.add_argument("--no-speed", dest="speed", action="store_false", help="skip the decode speed of each candidate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--keep-runs", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    model = str(reference_folder()) if args.model == "offgrid" else args.model
    resolve(model)  # fail early on a bad model
    chosen = {name: c for name, c in CANDIDATES.items() if not args.only or name in args.only}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(name, model, candidate, args.out, args) for name, candidate in chosen.items()]
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2))
    (args.out / "quality.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
