"""What the serving tests share: prompts, the runner's own greedy answer, a chat request."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from exporters.runner import chat_format
from workbench.generation import engine

PROMPTS = ["Write about the fox.", "Hi", "Tell me a long story about a dog and a cat who live by the sea.",
           "Why?", "Count to ten, slowly.", "What is the capital of France?", "Say something nice.", "Go on."]


def greedy_text(bundle: Path, prompt: str, tokens: int) -> str:
    """The runner's greedy chat answer, by its own engine and chat format in this process."""
    settings = json.loads((bundle / "runner.json").read_text())
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    model = engine.CausalLM(str(bundle / settings["model"]), context_length=settings["context_length"])
    ids = chat_format.encode(tokenizer, settings["chat"], [{"role": "user", "content": prompt}])
    return engine.generate(model, ids, engine.GenerationConfig(max_new_tokens=tokens), tokenizer=tokenizer,
                           eos_token_ids=settings["eos_token_ids"]).text


def chat(prompt: str, tokens: int) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
