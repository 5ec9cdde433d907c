"""Peak RAM of `quantize --method gptq --calibration FILE` with a huge calibration file and a small one.

    python benchmarks/calibration_memory.py MODEL [--big-gb 2] [--small-kb 100]

MODEL is anything `quantize` takes (a tiny model folder keeps the run short: the calibration file is
what is measured). Both text files are generated in a temporary folder, removed at the end. The RSS
of the whole process tree (the CLI and its export child) is sampled every 0.25 s; one JSON object
with both peaks, their difference and the machine's load is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("model", "weights", "quantization", "block", "scale", "memory", "text", "token", "layer", "answer", "prompt",
         "the", "of", "and", "a", "to", "in", "is", "small", "large", "fast", "slow", "calibration", "sample", "window",
         "file", "disk", "data", "people", "city", "river", "mountain", "history")
SAMPLE_SECONDS = 0.25


def write_text(path: Path, size: int) -> None:
    """`size` bytes of paragraphs of random words: a 4 MB block, each copy under its own heading."""
    rng = random.Random(0)
    paragraphs = []
    while sum(len(p) for p in paragraphs) < min(size, 4 * 2**20):
        sentences = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "."
                     for _ in range(rng.randint(3, 8)))
        paragraphs.append(" ".join(sentences) + "\n\n")
    block = "".join(paragraphs).encode()
    with path.open("wb") as handle:
        part = 0
        while handle.tell() < size:
            part += 1
            handle.write(f"Part {part}.\n\n".encode())
            handle.write(block[: size - handle.tell()])


def peak_tree_rss(command: list[str]) -> tuple[int, float, int]:
    """(peak RSS of the process and all its descendants, seconds, exit code)."""
    began = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            for member in [root, *root.children(recursive=True)]:
                total += member.memory_info().rss
        except psutil.Error:  # a member ended between listing and reading
            pass
        peak = max(peak, total)
        time.sleep(SAMPLE_SECONDS)
    stderr = process.stderr.read()
    if process.returncode:
        sys.stderr.write(stderr)
    return peak, time.monotonic() - began, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--big-gb", type=float, default=2.0)
    parser.add_argument("--small-kb", type=float, default=100.0)
    args = parser.parse_args()
    result = {"model": args.model, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="calibration-memory-") as folder:
        folder = Path(folder)
        for name, size in (("small", int(args.small_kb * 1e3)), ("big", int(args.big_gb * 1e9))):
            text = folder / f"{name}.txt"
            write_text(text, size)
            command = [sys.executable, "-m", "workbench.cli", "quantize", args.model, "-o", str(folder / f"run-{name}"),
                       "--method", "gptq", "--calibration", str(text), "-q"]
            peak, seconds, code = peak_tree_rss(command)
            result[name] = {"file_bytes": text.stat().st_size, "peak_rss_mib": round(peak / 2**20, 1),
                            "seconds": round(seconds, 1), "exit_code": code}
            text.unlink()
    result["difference_mib"] = round(result["big"]["peak_rss_mib"] - result["small"]["peak_rss_mib"], 1)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
