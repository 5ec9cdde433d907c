"""Render packaging/int4-workbench.svg to the PNG the desktop entry and the build use:
`python packaging/render_icon.py` after changing the SVG."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = 256


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    _app = QGuiApplication(sys.argv[:1])  # fonts need an application
    image = QImage(SIZE, SIZE, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    QSvgRenderer(str(HERE / "int4-workbench.svg")).render(painter)
    painter.end()
    saved = image.save(str(HERE / "int4-workbench.png"))
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(main())
