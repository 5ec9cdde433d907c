"""Conversations with both models, kept in the run folder: a chat goes on turn by turn; a prompt
file's answers are kept the same way. One JSON file per conversation in `conversations/`
(every turn's prompt, both answers, settings, figures and the original's judgement), read and
written only here.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.generation.compare import (
    CONVERSATIONS,
    CompareOptions,
    CompareResult,
    StreamCallback,
    compare,
)
from workbench.jobs import Cancelled, Progress, never_cancelled, no_progress

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
CHAT = "chat"  # turns follow each other: each model reads its own earlier answers
SUITE = "suite"  # a prompt file: each prompt answered on its own


@dataclass(frozen=True)
class Conversation:
    id: str  # the file name without .json
    kind: str  # CHAT | SUITE
    created: str  # ISO 8601, UTC
    turns: tuple[dict, ...] = ()  # compare's rows: prompt, original, int4, agreement, settings, judgement
    provider: str = ""  # of the latest turn

    @classmethod
    def new(cls, kind: str = CHAT) -> Conversation:
        now = datetime.now(timezone.utc)
        return cls(f"{now:%Y%m%d-%H%M%S}-{kind}-{secrets.token_hex(2)}", kind, now.isoformat(timespec="seconds"))

    @property
    def title(self) -> str:
        """The first prompt, shortened: how the conversation is listed."""
        first = " ".join(self.turns[0]["prompt"].split()) if self.turns else "(empty)"
        return first if len(first) <= 60 else first[:59] + "…"

    def with_result(self, result: CompareResult) -> Conversation:
        return Conversation(self.id, self.kind, self.created, (*self.turns, *result.rows), result.provider)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "id": self.id, "kind": self.kind, "created": self.created,
            "provider": self.provider, "turns": list(self.turns),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Conversation:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise WorkbenchError(
                f"Conversation {data.get('id')!r} was saved by another version of the workbench "
                f"(format {data.get('schema_version')}, this one reads {SCHEMA_VERSION})."
            )
        return cls(data["id"], data["kind"], data["created"], tuple(data["turns"]), data.get("provider", ""))


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / CONVERSATIONS


def save(run_dir: Path, conversation: Conversation) -> Path:
    """Write the conversation whole (a temporary file renamed over the old one)."""
    directory = folder(run_dir)
    path = directory / f"{conversation.id}.json"
    temporary = directory / f".{conversation.id}.json.partial"
    try:
        directory.mkdir(exist_ok=True)
        temporary.write_text(json.dumps(conversation.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise WorkbenchError(f"Cannot save the conversation in {directory} ({error.strerror}).") from error
    return path


def list_conversations(run_dir: Path) -> list[Conversation]:
    """The run's saved conversations, oldest first; a file that cannot be read is skipped (logged)."""
    found = []
    for path in sorted(folder(run_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if "turns" not in data:  # memory.json and other files of the folder
                continue
            found.append(Conversation.from_dict(data))
        except (OSError, json.JSONDecodeError, KeyError, WorkbenchError) as error:
            log.warning("skipped %s: %s", path, error)
    return sorted(found, key=lambda c: c.created)


def ask(
    run_dir: Path,
    conversation: Conversation,
    prompt: str,
    options: CompareOptions = CompareOptions(),
    *,
    on_token: StreamCallback | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> Conversation:
    """The next turn of a chat: both models answer `prompt` after their own earlier answers; saved."""
    if conversation.kind != CHAT:
        raise WorkbenchError("A prompt file's answers cannot be continued; start a new conversation.")
    result = compare(
        run_dir, [prompt], options, history=conversation.turns, on_token=on_token, progress=progress,
        cancelled=cancelled,
    )
    conversation = conversation.with_result(result)
    save(run_dir, conversation)
    return conversation


def run_suite(
    run_dir: Path,
    prompts: Sequence[str],
    options: CompareOptions = CompareOptions(),
    *,
    on_token: StreamCallback | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> tuple[CompareResult, Conversation]:
    """Every prompt answered on its own (compare), kept as one saved conversation."""
    result = compare(run_dir, prompts, options, on_token=on_token, progress=progress, cancelled=cancelled)
    conversation = Conversation.new(SUITE if len(prompts) > 1 else CHAT).with_result(result)
    save(run_dir, conversation)
    return result, conversation


def as_result(conversation: Conversation) -> CompareResult:
    """A saved conversation's turns as a comparison result again (its table, its averages)."""
    return CompareResult(conversation.provider, "as saved", list(conversation.turns))

