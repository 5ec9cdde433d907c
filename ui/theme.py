"""The app's look: Fusion everywhere (the same on every system), a readable size, calm colours."""

from __future__ import annotations

from PySide6.QtWidgets import QApplication

BASE_POINT_SIZE = 10.5
ACCENT = "#2f6fdb"
RUN_ITEM_PADDING_X = 14  # px either side of an earlier run's lines (ui.widgets.PaddedWrapDelegate sizes by it)
STYLESHEET = f"""
#sidebar {{ background: #eef1f5; border-right: 1px solid #d9dee6; }}
#steps, #runs {{ background: transparent; border: none; outline: none; }}
#steps::item {{ padding: 9px 14px; border-radius: 6px; margin: 1px 8px; }}
#steps::item:selected {{ background: {ACCENT}; color: white; }}
#steps::item:disabled {{ color: #9aa3ae; }}
#runs::item {{ padding: 6px {RUN_ITEM_PADDING_X}px; }}
#runs::item:selected {{ background: #d6e3f8; color: black; }}
#sideTitle {{ font-weight: 600; color: #4a5563; padding: 10px 14px 0 22px; }}
#pageTitle {{ font-size: 18pt; font-weight: 600; }}
#pagePurpose {{ color: #4a5563; font-size: 11.5pt; padding-bottom: 6px; }}
#hint {{ color: #6b7480; }}
QGroupBox {{ font-weight: 600; border: 1px solid #d9dee6; border-radius: 8px; margin-top: 14px;
            padding: 18px 14px 12px 14px; }}
QGroupBox QWidget {{ font-weight: normal; }}
QGroupBox::title {{ subcontrol-origin: margin; left: 12px; padding: 0 4px; color: #3a4350; }}
QPushButton {{ padding: 7px 16px; border-radius: 6px; border: 1px solid #c5ccd6; background: white; }}
QPushButton:hover {{ background: #f0f4fb; }}
QPushButton:disabled {{ color: #a0a7b1; background: #f3f4f6; border-color: #dde1e6; }}
QPushButton#primary {{ background: {ACCENT}; color: white; border-color: {ACCENT}; font-weight: 600; }}
QPushButton#primary:hover {{ background: #285fbd; }}
QPushButton#primary:disabled {{ background: #a9c1ec; border-color: #a9c1ec; }}
QToolButton#collapsible {{ border: none; font-weight: 600; color: #3a4350; padding: 4px 0; }}
QLabel#inline {{ border-radius: 6px; padding: 10px 12px; border: 1px solid transparent; }}
QLabel#inline[kind="problem"] {{ color: #9f1f17; background: #fdecea; border-color: #f5c2bd; }}
QLabel#inline[kind="note"] {{ color: #1f4e8c; background: #e8f0fc; border-color: #c9dbf6; }}
#card {{ border: 1px solid #d9dee6; border-radius: 10px; background: white; }}
#card[selected="true"] {{ border: 2px solid {ACCENT}; background: #f4f8ff; }}
#cardTitle {{ font-weight: 600; font-size: 12.5pt; }}
#cardSize {{ color: {ACCENT}; font-weight: 600; }}
#estimate {{ font-size: 12pt; }}
#verdict {{ font-size: 12.5pt; padding: 12px 14px; background: #f4f8ff; border-radius: 8px; }}
#sample {{ background: #fafbfc; color: #333; padding: 8px; }}
#stageMark {{ font-size: 13pt; }}
#stageMark[state="waiting"] {{ color: #9aa3ae; }}
#stageMark[state="running"] {{ color: {ACCENT}; }}
#stageMark[state="done"] {{ color: #2e7d32; }}
#stageMark[state="stopped"] {{ color: #c62828; }}
#stageDetail, #jobMessage {{ color: #4a5563; }}
QProgressBar {{ border: 1px solid #c5ccd6; border-radius: 5px; background: #eef1f5; min-height: 14px;
               max-height: 14px; text-align: center; }}
QProgressBar::chunk {{ background: {ACCENT}; border-radius: 4px; }}
"""


def apply_theme(app: QApplication) -> None:
    app.setStyle("Fusion")
    font = app.font()
    font.setPointSizeF(BASE_POINT_SIZE)
    app.setFont(font)
    app.setStyleSheet(STYLESHEET)
