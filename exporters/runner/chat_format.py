"""A model's chat template as fixed pieces of text, applied without Jinja.

This file needs only the standard library: a bundle ships it unchanged next to its runner. The
workbench renders the model's Jinja chat template once, at bundle time, with placeholder messages
and keeps the text around them (exporters.bundle.chat_template); here those pieces are joined
around real messages. The workbench checks, for conversations of each shape it allows, that the
joined text equals the template's own rendering.

A format (JSON):
  start            text before the first message when there is no system message
  system_start     text before a system message (absent when the template has no system role)
  between          {"system>user", "user>assistant", "assistant>user": text between two messages}
  generation_prompt  text after the last user message, where the answer begins
  strip_content    whether the template trims each message's content
  multi_turn       whether conversations longer than one question come out right
A model without a chat template has no format (null): its prompts are plain text.
"""

from __future__ import annotations

from collections.abc import Sequence


class ChatFormatError(ValueError):
    """A conversation this format cannot express; the message says why."""


def render(chat: dict, messages: Sequence[dict]) -> str:
    """The prompt text of `messages` ({"role", "content"}), ready for the answer to follow."""
    if not messages:
        raise ChatFormatError("A conversation needs at least one message.")
    roles = [m["role"] for m in messages]
    if roles[-1] != "user":
        raise ChatFormatError("The last message must be the user's.")
    if "system" in roles[1:]:
        raise ChatFormatError("Only the first message may be a system message.")
    if roles[0] == "system" and chat.get("system_start") is None:
        raise ChatFormatError("This model's chat template has no system role; leave the system prompt out.")
    questions = roles.count("user")
    if questions > 1 and not chat["multi_turn"]:
        raise ChatFormatError("This model's chat template cannot be followed for more than one question.")
    pieces = [chat["system_start"] if roles[0] == "system" else chat["start"]]
    previous = None
    for message in messages:
        if previous is not None:
            pair = f"{previous}>{message['role']}"
            if pair not in chat["between"]:
                raise ChatFormatError(f"A {message['role']} message cannot follow a {previous} message.")
            pieces.append(chat["between"][pair])
        content = message["content"]
        pieces.append(content.strip() if chat["strip_content"] else content)
        previous = message["role"]
    pieces.append(chat["generation_prompt"])
    return "".join(pieces)


def encode(tokenizer, chat: dict | None, messages: Sequence[dict], plain: bool = False) -> list[int]:
    """Token ids of the prompt (`tokenizer` is a tokenizers.Tokenizer); `plain` skips the chat format."""
    if plain or chat is None:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise ChatFormatError("Without a chat template a prompt is one plain text; leave the system prompt out.")
        return tokenizer.encode(messages[0]["content"], add_special_tokens=True).ids
    # The rendered template already holds the special tokens it wants.
    return tokenizer.encode(render(chat, messages), add_special_tokens=False).ids
