"""Decode speed per parameter of each architecture's fused INT4 graph, relative to Llama's.

    flock /work/notes/bench.lock python benchmarks/arch_speed.py            # all families, 3 rounds
    python benchmarks/arch_speed.py --rounds 5 --only llama gemma2 --keep

For each family the graph builder knows, a random-initialised model of one common shape (~110M
parameters: hidden 768, 12 layers, 12 heads of 64, 4 KV heads, MLP 2048, vocabulary 49,152, tied
embeddings) with that family's own features (biases, q/k norms, multipliers, LongRoPE with partial
rotary, soft-capping, post norms, local rotary base, sliding windows) is written with transformers
(bf16 safetensors) to --cache, and its round-to-nearest INT4 graph is written by the builder as
`quantize --method rtn` writes it. Each graph is then measured as `bench` measures a model
(workbench.generation.bench.measure_in_process in a fresh child: load, warm up, a short prompt,
`--new-tokens` greedy tokens), the families alternating within each round and their order rotated
from round to round, so a busy machine slows them alike. Printed: the median decode tokens/s, the
parameter count, tokens/s x parameters (decode speed per parameter) and its ratio to Llama's, with
the machine's load (`uptime`) before and after, then one JSON object. The models are deleted
afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import LLAMA3_ROPE, write_tokenizer  # noqa: E402 (after sys.path)

SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
             intermediate_size=2048, vocab_size=49152, max_position_embeddings=16384, tie_word_embeddings=True,
             bos_token_id=0, eos_token_id=1, pad_token_id=2)
ROTARY_HALF = int(64 * 0.75) // 2  # Phi-4-mini rotates 3/4 of each head: one LongRoPE factor per pair
# (transformers config class name, the family's own settings, as its published models set them)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "mistral": ("MistralConfig", {"sliding_window": 4096}),
    "qwen2": ("Qwen2Config", {"rope_theta": 1000000.0}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"rope_theta": 1000000.0}),  # q/k norms
    "granite": ("GraniteConfig", {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                  "attention_multiplier": 0.015625, "logits_scaling": 8.0}),
    "smollm3": ("SmolLM3Config", {"no_rope_layers": [int((i + 1) % 4 != 0) for i in range(12)]}),
    "phi3": ("Phi3Config", {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 4096,
                            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * ROTARY_HALF,
                                             "long_factor": [1.0 + i / 4 for i in range(ROTARY_HALF)]}}),
    "gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 64, "sliding_window": 4096,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", {"query_pre_attn_scalar": 64, "sliding_window": 512,
                                    "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
                                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
}


def write_model(folder: Path, family: str) -> None:
    import torch
    import transformers

    class_name, own = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, SHAPE["vocab_size"])
    config = getattr(transformers, class_name)(**{**SHAPE, **own})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)


def build_int4(model_dir: Path, dest: Path) -> int:
    """The RTN INT4 graph `quantize --method rtn` writes; returns the model's parameter count."""
    from exporters.builder import build_decoder
    from workbench.settings import QuantSettings
    from workbench.sources import inspect_folder

    info = inspect_folder(model_dir)
    build_decoder(model_dir, dest, info, QuantSettings(method="rtn"))
    return info.parameters


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("/work/bench/arch"))
    parser.add_argument("--only", nargs="*", choices=sorted(FAMILIES), help="these families (llama is always in)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument("--keep", action="store_true", help="keep the models and graphs")
    args = parser.parse_args()

    from workbench.generation.bench import measure_in_process  # noqa: F401 (the child's target, checked here)
    from workbench.subprocess_job import run_in_subprocess

    families = ["llama"] + [f for f in (args.only or FAMILIES) if f != "llama"]
    result: dict = {"shape": SHAPE, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
                    "new_tokens": args.new_tokens, "before": uptime(), "families": {}}
    try:
        for family in families:
            model_dir, int4_dir = args.cache / family / "model", args.cache / family / "int4"
            if not (int4_dir / "model.onnx").is_file():
                shutil.rmtree(args.cache / family, ignore_errors=True)
                write_model(model_dir, family)
                parameters = build_int4(model_dir, int4_dir)
            else:
                from workbench.sources import inspect_folder

                parameters = inspect_folder(model_dir).parameters
            result["families"][family] = {"parameters": parameters, "rounds": []}
            print(f"built {family}: {parameters / 1e6:.1f}M parameters", file=sys.stderr, flush=True)
        result["built"] = uptime()
        for round_index in range(args.rounds):
            shift = round_index % len(families)
            for family in families[shift:] + families[:shift]:
                measured = run_in_subprocess(
                    "workbench.generation.bench:measure_in_process",
                    {"model_dir": str(args.cache / family / "int4"), "provider": "cpu", "threads": args.threads,
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens},
                    expected_seconds=20.0, message="measuring speed",
                )
                result["families"][family]["rounds"].append(
                    {"tokens_per_s": round(measured["tokens_per_s"], 2),
                     "peak_rss_mib": round(measured["peak_rss_bytes"] / 2**20)})
                print(f"round {round_index + 1}: {family} {measured['tokens_per_s']:.1f} tok/s", file=sys.stderr,
                      flush=True)
            result[f"after_round_{round_index + 1}"] = uptime()
    finally:
        if not args.keep:
            for family in families:
                shutil.rmtree(args.cache / family, ignore_errors=True)
    llama = result["families"]["llama"]
    llama_rate = statistics.median(r["tokens_per_s"] for r in llama["rounds"]) * llama["parameters"]
    width = 6 * args.rounds + 2  # the rounds' figures, never run into the median before them
    lines = [f"{'family':10}{'params':>10}{'decode tok/s':>14}{'rounds':>{width}}{'tok/s x params':>16}{'vs llama':>10}"]
    for family, entry in result["families"].items():
        speeds = [r["tokens_per_s"] for r in entry["rounds"]]
        entry["tokens_per_s"] = statistics.median(speeds)
        entry["speed_per_parameter"] = entry["tokens_per_s"] * entry["parameters"]
        entry["ratio_to_llama"] = round(entry["speed_per_parameter"] / llama_rate, 3)
        lines.append(f"{family:10}{entry['parameters'] / 1e6:>9.1f}M{entry['tokens_per_s']:>14.1f}"
                     f"{' '.join(f'{s:.1f}' for s in speeds):>{width}}{entry['speed_per_parameter'] / 1e9:>15.2f}G"
                     f"{entry['ratio_to_llama']:>10.3f}")
    lines.append(f"load before: {result['before']}")
    lines.append(f"load after:  {result[f'after_round_{args.rounds}']}")
    print("\n".join(lines))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
