"""A tokenizer's Jinja chat template written down as fixed text (exporters.runner.chat_format), checked."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from exporters.runner import chat_format
from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)
SENTINELS = {"system": "INT4WB-SYSTEM-0", "user": "INT4WB-USER-1", "assistant": "INT4WB-ASSISTANT-2",
             "user2": "INT4WB-USER-3"}


def chat_format_of(tokenizer) -> dict | None:
    """The tokenizer's Jinja chat template as fixed text (exporters.runner.chat_format), checked.

    The template is rendered with placeholder contents; the text between placeholders is what the
    template puts around messages. The pieces are then joined for conversations of every allowed
    shape and compared with the template's own rendering of the same conversations.
    """
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        return None

    def rendered(messages: Sequence[dict]) -> str:
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def message(role: str, content: str) -> dict:
        return {"role": role, "content": content}

    s = SENTINELS
    start, user_assistant, assistant_user, generation_prompt = _split(
        rendered([message("user", s["user"]), message("assistant", s["assistant"]), message("user", s["user2"])]),
        [s["user"], s["assistant"], s["user2"]],
    )
    try:
        system_start, system_user, _ = _split(
            rendered([message("system", s["system"]), message("user", s["user"])]), [s["system"], s["user"]]
        )
    except TemplateError:  # templates without a system role raise from inside Jinja
        system_start = system_user = None
    padded = rendered([message("user", f"  {s['user']}\n ")])
    chat = {
        "start": start,
        "system_start": system_start,
        "between": {"user>assistant": user_assistant, "assistant>user": assistant_user},
        "generation_prompt": generation_prompt,
        "strip_content": f"  {s['user']}\n " not in padded,
        "multi_turn": True,
    }
    if system_start is not None:
        chat["between"]["system>user"] = system_user
    system = [message("system", "Answer briefly.")] if system_start is not None else []
    one_question = [message("user", "What is 2 + 2?")]
    conversation = [*one_question, message("assistant", "4"), message("user", "And 3 + 3?"),
                    message("assistant", "6"), message("user", "Thanks!")]
    for shape in (one_question, system + one_question):
        if chat_format.render(chat, shape) != rendered(shape):
            raise WorkbenchError(
                "This model's chat template cannot be written down as fixed text for the runner (it changes with "
                "the messages in ways the bundle cannot follow). Bundle a model with a simpler chat template."
            )
    chat["multi_turn"] = all(
        chat_format.render(chat, shape) == rendered(shape) for shape in (conversation, system + conversation)
    )
    if not chat["multi_turn"]:
        log.warning("chat template does not compose over several turns; the runner answers each message on its own")
    return chat


def _split(text: str, sentinels: Sequence[str]) -> list[str]:
    """`text` cut at each sentinel, in order: len(sentinels) + 1 pieces."""
    pieces = []
    for sentinel in sentinels:
        before, found, text = text.partition(sentinel)
        if not found:
            raise WorkbenchError(
                "This model's chat template drops or reorders message contents, so the runner cannot follow it. "
                "Bundle a model with a plain chat template."
            )
        pieces.append(before)
    return [*pieces, text]
