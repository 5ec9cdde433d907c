"""Chat with this INT4 model: `python run.py` (a conversation) or `python run.py --prompt "..."` (one answer);
`python run.py --serve` serves it over the OpenAI HTTP API (serve.py).

Needs only onnxruntime (or onnxruntime-gpu), tokenizers and numpy: `pip install -r requirements.txt`.
engine.py is the INT4 Workbench's own decoding engine, unchanged; runner.json holds the model's chat
format, end-of-sequence ids and context length; `python run.py --help` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from pathlib import Path

import onnxruntime as ort
from tokenizers import Tokenizer

import engine
import serve
from chat_format import ChatFormatError, encode

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with this INT4 model (ONNX Runtime).")
    parser.add_argument("--prompt", help="answer this one prompt and exit (default: a conversation)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--no-chat", action="store_true", help="send the prompt as plain text, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the same answer every time)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none")
    parser.add_argument("--seed", type=int, help="same seed, same text when sampling")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA when onnxruntime-gpu and an NVIDIA GPU work, else the CPU")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def load_model(settings: dict, provider: str, threads: int | None, spinning: bool = True) -> engine.CausalLM:
    cuda_available = engine.CUDA in ort.get_available_providers()
    if provider == "cuda" and not cuda_available:
        raise SystemExit("error: this onnxruntime has no CUDA provider; pip install onnxruntime-gpu, or use --provider cpu.")
    providers = [engine.CUDA, engine.CPU] if provider != "cpu" and cuda_available else [engine.CPU]
    # With `auto`, a GPU build on a machine without a usable GPU is expected: ONNX Runtime's report of
    # it (on file descriptor 2) is hidden and replaced by one line.
    with hidden_stderr(provider == "auto"):
        model = engine.CausalLM(
            HERE / settings["model"], providers=providers, threads=threads, context_length=settings["context_length"],
            spinning=spinning,
        )
    if provider == "cuda" and model.device != "cuda":
        raise SystemExit("error: the CUDA provider did not start (no GPU or CUDA libraries found); use --provider cpu.")
    if provider == "auto" and cuda_available and model.device != "cuda":
        print("CUDA cannot be used here; answering on the CPU.", file=sys.stderr)
    return model


@contextlib.contextmanager
def hidden_stderr(hide: bool):
    if not hide:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def answer(model, tokenizer, settings: dict, config: engine.GenerationConfig, ids: list[int], truncate: bool) -> str:
    def show(_token: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = engine.generate(
        model, ids, config, tokenizer=tokenizer, eos_token_ids=settings["eos_token_ids"], on_token=show,
        truncate=truncate,
    )
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(
        f"[{len(result.tokens)} tokens, {result.decode_tokens_per_s:.1f} tokens/s, first after {result.ttft_s:.2f} s, "
        f"{model.device}, ended by {result.finish_reason}]",
        file=sys.stderr,
    )
    return result.text


def converse(model, tokenizer, settings: dict, config: engine.GenerationConfig, args: argparse.Namespace) -> None:
    chat = settings["chat"]
    remembers = chat is not None and chat["multi_turn"] and not args.no_chat
    print(
        "Type a message and press Enter; /reset forgets the conversation, /exit or Ctrl-D ends it."
        + ("" if remembers else " Each message is answered on its own (this model's format keeps no history)."),
        file=sys.stderr,
    )
    history: list[dict] = []
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        turn = [*history, {"role": "user", "content": line}] if remembers else [{"role": "user", "content": line}]
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = encode(tokenizer, settings["chat"], system + turn, args.no_chat)
        try:
            text = answer(model, tokenizer, settings, config, ids, truncate=True)  # a long talk keeps its end
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
            continue
        history = [*turn, {"role": "assistant", "content": text}]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    settings = json.loads((HERE / "runner.json").read_text(encoding="utf-8"))
    try:
        config = engine.GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
        )
        tokenizer = Tokenizer.from_file(str(HERE / settings["tokenizer"]))
        if args.serve:
            load = functools.partial(load_model, settings, args.provider, args.threads, serve.SPINNING)
            return serve.serve(args, load, tokenizer, settings, HERE.name)
        model = load_model(settings, args.provider, args.threads)
        if args.prompt is None:
            converse(model, tokenizer, settings, config, args)
            return 0
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        ids = encode(tokenizer, settings["chat"], messages, args.no_chat)
        answer(model, tokenizer, settings, config, ids, truncate=False)
    except (engine.GenerationError, ChatFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
