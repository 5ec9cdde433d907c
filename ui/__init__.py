"""The PySide6 desktop app: a wizard over the core's plain functions (workbench/), no logic of its own."""
