"""INT4 Workbench core: no Qt here, ever (the GUI lives in ui/)."""

__version__ = "0.1.0"
