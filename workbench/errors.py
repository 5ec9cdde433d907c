"""Errors meant for the user: each message says what happened and what to do."""


class WorkbenchError(Exception):
    """A problem the user can fix; the message is shown as is (no traceback)."""


class JobCancelled(Exception):
    """Raised inside a long step when its `cancelled()` callable returned True."""
