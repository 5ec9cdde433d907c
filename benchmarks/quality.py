"""Quality and size benchmark on the off-grid reference (`make bench`).

The demo model's weights lie on a 4-bit grid, so its quality figures flatter every method. This
builds (once, cached) the same model in a randomly rotated basis, quantizes it with each preset
and with the anchor settings, and measures perplexity, top-1 agreement and KL on two texts used
neither for calibration (calibration is data-free unless --calibration is given) nor for choosing
the presets' settings: the start of ../shared/data/tinyshakespeare.txt and
benchmarks/data/sqlite_essays.txt. Results go to bench-results/quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from workbench.evaluate import evaluate
from workbench.offgrid import build_offgrid_reference
from workbench.pipeline import quantize_run
from workbench.settings import PRESETS, QuantSettings
from workbench.sources import cache_dir, demo_folder, resolve

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {
    "tinyshakespeare": ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
    "sqlite_essays": ROOT / "benchmarks" / "data" / "sqlite_essays.txt",
}
ANCHORS = {
    "rtn-sym-b32": QuantSettings(method="rtn", block_size=32, symmetric=True),
    "rtn-asym-b32": QuantSettings(method="rtn", block_size=32, symmetric=False),
    "hqq-b32": QuantSettings(method="hqq", block_size=32, symmetric=False),
}
log = logging.getLogger("bench")


def reference_folder() -> Path:
    folder = cache_dir() / "offgrid" / "smollm2-135m-rotated-seed0"
    if not (folder / "config.json").is_file():
        log.info("building the off-grid reference in %s", folder)
        build_offgrid_reference(demo_folder(), folder, seed=0)
    return folder


def measure(name: str, model: str, settings: QuantSettings, out: Path, args, preset: str | None) -> dict:
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    record = quantize_run(model, run_dir, settings, calibration=args.calibration, preset=preset)
    row = {
        "name": name,
        "settings": settings.to_dict(),
        "int4_bytes": record["int4"]["bytes"],
        "original_bytes": record["original"]["bytes"],
        "size_ratio": record["size_ratio"],
        "bits_per_weight": record["bits_per_weight"],
        "timings_s": record["timings_s"],
        "wall_s": round(time.perf_counter() - began, 1),
        "quality": {},
    }
    for text, path in TEXTS.items():
        if not path.is_file():
            log.warning("%s is missing; skipping it", path)
            continue
        result = evaluate(run_dir / "original", run_dir / "int4", path, max_tokens=args.tokens)
        row["quality"][text] = result.to_dict()
    log.info("%s: %s", name, json.dumps({k: row[k] for k in ("size_ratio", "wall_s")} | {
        t: q["perplexity_increase_pct"] for t, q in row["quality"].items()}))
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def markdown(rows: list[dict]) -> str:
    texts = list(TEXTS)
    header = "| candidate | MB | x smaller | bits/weight | " + " | ".join(
        f"{t} ppl +% | {t} top-1" for t in texts) + " | quantize s |"
    lines = [header, "|" + "---|" * (5 + 2 * len(texts))]
    for row in rows:
        cells = [row["name"], f"{row['int4_bytes'] / 1e6:.1f}", f"{row['size_ratio']:.2f}",
                 f"{row['bits_per_weight']:.2f}"]
        for text in texts:
            quality = row["quality"].get(text)
            cells += [f"{quality['perplexity_increase_pct']:+.1f}", f"{quality['top1_agreement'] * 100:.1f} %"] if quality else ["-", "-"]
        timings = row["timings_s"]
        cells.append(f"{timings.get('int4', 0) + timings.get('gptq', 0) + timings.get('calibration', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="offgrid", help="'offgrid' (default), 'demo', or any model spec")
    parser.add_argument("--only", nargs="*", help="candidate names to run (presets and anchors)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens scored per text")
    parser.add_argument("--calibration", type=Path, help="calibration file (default: data-free)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--keep-runs", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    model = str(reference_folder()) if args.model == "offgrid" else args.model
    resolve(model)  # fail early on a bad model
    candidates = {**{f"preset-{n}": p.settings for n, p in PRESETS.items()}, **ANCHORS}
    chosen = {n: s for n, s in candidates.items() if not args.only or n in args.only}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(n, model, s, args.out, args, n.removeprefix("preset-") if n.startswith("preset-") else None)
            for n, s in chosen.items()]
    (args.out / "quality.json").write_text(json.dumps(rows, indent=2))
    (args.out / "quality.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
