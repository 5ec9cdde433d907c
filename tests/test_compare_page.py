"""The Compare page as a chat, in a real offscreen window on the tiny model: both answers stream at
once, turns follow each other, the 4-bit answer's unlikely words are highlighted, and the
conversation is back when the run is opened again."""

from __future__ import annotations

import json

from PySide6.QtCore import QPoint, QRect, Qt

from ui.pages.compare import ComparePage
from conftest import ask_on_compare, open_run_on, wait_for_jobs as wait
from workbench.generation.chat import folder, list_conversations
from workbench.generation.compare import ANSWER_END


def open_compare(qtbot, tiny_run):
    return open_run_on(qtbot, tiny_run, ComparePage)


def test_a_conversation_streams_both_models_at_once_and_comes_back_with_the_run(qtbot, tiny_run):
    window, page = open_compare(qtbot, tiny_run)
    page.max_tokens.setValue(100)
    arrivals = ask_on_compare(qtbot, page, "Hello, who are you?")
    switches = sum(a != b for a, b in zip(arrivals, arrivals[1:]))
    assert set(arrivals) == {"original", "int4"} and switches >= 2, "the answers did not stream at the same time"
    assert "Memory this app held while both models wrote" in page.memory_now.text()

    first = page.conversation
    turn = first.turns[0]
    for column in page.columns.values():
        assert column.metrics["speed"].text().endswith("tokens per second")
        assert "Hello, who are you?" in column.text.toPlainText()
    judgement = turn["judgement"]
    assert judgement["sentence"] in page.judgement.text()
    highlighted = page.columns["int4"].highlighted()
    assert bool(highlighted) == any(u["end"] > u["start"] for u in judgement["unlikely"])
    # Only the unlikely words are marked (their exact place is checked on a known text below).
    marked = sum(u["end"] - u["start"] for u in judgement["unlikely"])
    assert len("".join(highlighted)) <= marked <= len(turn["int4"]["text"])
    assert not page.columns["original"].highlighted()

    page.max_tokens.setValue(8)
    page.ask("Count to three.")
    wait(qtbot)
    assert not page.problem.isVisible(), page.problem.text()
    assert page.conversation.id == first.id and len(page.conversation.turns) == 2
    for column in page.columns.values():
        text = column.text.toPlainText()
        assert text.index("Hello, who are you?") < text.index("Count to three.")
    saved = json.loads((folder(tiny_run) / f"{first.id}.json").read_text(encoding="utf-8"))
    assert [t["prompt"] for t in saved["turns"]] == ["Hello, who are you?", "Count to three."]
    window.close()

    # Opened again, in a new window: the conversation is listed and shown, and goes on from there.
    window, page = open_compare(qtbot, tiny_run)
    listed = [page.conversations.itemData(i) for i in range(page.conversations.count())]
    assert first.id in listed and page.conversation.id == first.id
    assert "Count to three." in page.columns["int4"].text.toPlainText()
    assert page.judgement.text() and page.columns["int4"].metrics["tokens"].text().startswith("8 tokens")
    for key, column in page.columns.items():  # an answer stopped by the token limit says so where it stops
        cut = page.conversation.turns[-1][key]["finish_reason"] == "length"
        assert column.text.toPlainText().endswith("(cut off here: the longest answer allowed was reached "
                                                  "(Generation settings))") == cut
    page.show_conversation(None)
    assert page.columns["int4"].text.toPlainText() == "" and page.conversations.currentIndex() == 0
    page.conversations.setCurrentIndex(listed.index(first.id))
    page.conversations.activated.emit(listed.index(first.id))
    assert page.conversation == list_conversations(tiny_run)[-1]
    window.close()


def test_markdown_is_rendered_and_marks_become_highlights(qtbot, tiny_run):
    window, page = open_compare(qtbot, tiny_run)
    column = page.columns["int4"]
    answer = "The sky is **blue** because of `Rayleigh` scattering."
    start = answer.index("blue")
    column.show_turns([("why is the sky blue", answer, [(start, start + 4)])])
    text = column.text.toPlainText()
    assert "**" not in text and "`" not in text and "blue because" in text
    assert column.highlighted() == ["blue"] and "\ue000" not in text and "\ue001" not in text
    window.close()


def test_while_both_write_the_progress_and_cancel_are_in_sight_under_the_answers(qtbot, tiny_run):
    window, page = open_compare(qtbot, tiny_run)
    assert all(column.text.placeholderText() for column in page.columns.values())  # empty panes say what they are for
    page.show_conversation(None)  # a new one: the tiny model's short context holds no earlier turns
    page.max_tokens.setValue(100)
    page.ask("Tell me a long story.")
    assert page.panel.isVisible() and page.panel.cancel_button.isEnabled()
    viewport = window.stack.currentWidget().viewport()
    cancel = page.panel.cancel_button
    assert viewport.rect().contains(QRect(cancel.mapTo(viewport, QPoint(0, 0)), cancel.size()))  # no scrolling needed
    below_answers = max(c.geometry().bottom() for c in page.columns.values())
    assert below_answers < page.panel.geometry().top() < page.prompt.geometry().top()
    qtbot.mouseClick(cancel, Qt.MouseButton.LeftButton)
    wait(qtbot)
    assert not page.panel.isVisible() and "not kept" in page.problem.text()
    window.close()


def test_a_finished_answer_shows_final_figures_while_the_other_still_writes(qtbot, tiny_run):
    window, page = open_compare(qtbot, tiny_run)
    column = page.columns["int4"]
    column.begin("Hello")
    for piece in ("One", " two", " three"):
        qtbot.wait(5)  # the speed needs time between tokens
        column.add(piece)
    assert column.metrics["tokens"].text() == "3 tokens so far" and "so far" in column.metrics["speed"].text()
    page._token(("int4", 0, ANSWER_END, ""))  # as the stream ends this model's answer
    assert column.metrics["tokens"].text() == "3 tokens" and column.metrics["speed"].text().endswith("tokens per second")
    assert "One two three" in column.text.toPlainText()
    window.close()
