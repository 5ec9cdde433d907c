"""Rebuild sqlite_essays.txt from Debian's sqlite3-doc package (see SOURCES.md).

    apt-get download sqlite3-doc && dpkg -x sqlite3-doc_*.deb pkg
    python make_sqlite_essays.py pkg/usr/share/doc/sqlite3 sqlite_essays.txt

Keeps headings, paragraphs and list items; drops menus, scripts, tables of contents, tables,
code blocks and syntax diagrams, so what remains is prose.
"""

from __future__ import annotations

import html.parser
import re
import sys
from pathlib import Path

# Essays and explanations rather than reference pages, in a reading order.
PAGES = (
    "about.html",
    "whentouse.html",
    "serverless.html",
    "zeroconf.html",
    "appfileformat.html",
    "onefile.html",
    "flextypegood.html",
    "whyc.html",
    "testing.html",
    "atomiccommit.html",
    "howtocorrupt.html",
    "isolation.html",
    "lockingv3.html",
    "wal.html",
    "lts.html",
)
HEADINGS = {"title", "h1", "h2", "h3", "h4"}
BLOCKS = HEADINGS | {"p", "li", "dd", "dt", "blockquote", "div"}
SKIPPED = {"script", "style", "pre", "table", "svg", "form", "codeblock"}
SKIPPED_CLASSES = {"nosearch", "fancy_toc", "toc", "imgcontainer", "codeblock", "rightsidebar"}


class ProseExtractor(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.heading = False
        self.skip_stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        if self.skip_stack or tag in SKIPPED or classes & SKIPPED_CLASSES:
            # Void elements never close, so only container tags enter the stack.
            if tag not in {"br", "img", "input", "hr", "meta", "link"}:
                self.skip_stack.append(tag)
            return
        if tag in BLOCKS:
            self.flush()
            self.heading = tag in HEADINGS
        elif tag == "sup":
            self.current.append("^")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_stack:
            if tag in self.skip_stack:
                while self.skip_stack.pop() != tag:
                    pass
            return
        if tag in BLOCKS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if not self.skip_stack:
            self.current.append(data)

    def flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        self.current = []
        # Short fragments are captions, link lists and the like.
        keep = (self.heading or len(text.split()) >= 8) and not text.startswith("This page last modified")
        if text and keep and self.blocks[-1:] != [text]:
            self.blocks.append(text)
        self.heading = False


def prose(page: Path) -> list[str]:
    extractor = ProseExtractor()
    extractor.feed(page.read_text(encoding="utf-8"))
    extractor.flush()
    return extractor.blocks


def main(doc_dir: str, out: str) -> None:
    pages = ["\n\n".join(prose(Path(doc_dir) / name)) for name in PAGES]
    Path(out).write_text("\n\n\n".join(pages) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
