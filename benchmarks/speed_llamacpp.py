"""llama.cpp's decode speed on a GGUF, for comparison with `int4-workbench bench` (not a dependency).

Runs under a Python that has llama-cpp-python (a separate venv; see benchmarks/speed.py) and prints
one JSON object: decode tokens/s for greedy tokens and time to first token for the prompt.
"""

import argparse
import json
import time

from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    args = parser.parse_args()
    model = Llama(args.gguf, n_ctx=1024, n_threads=args.threads, n_batch=512, verbose=False)
    text = "The history of the lighthouse keeper's island is long and quiet. " * 64
    prompt = model.tokenize(text.encode())[: args.prompt_tokens]
    model.eval(prompt[:16])  # warm-up
    model.reset()
    began = time.perf_counter()
    model.eval(prompt)
    token = model.sample(temp=0.0)
    ttft = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(args.new_tokens):
        model.eval([token])
        token = model.sample(temp=0.0)
    decode = time.perf_counter() - began
    print(json.dumps({"ttft_s": round(ttft, 4), "tokens_per_s": round(args.new_tokens / decode, 2),
                      "threads": args.threads, "gguf": args.gguf}))


if __name__ == "__main__":
    main()
