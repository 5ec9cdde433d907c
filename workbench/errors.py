"""Errors meant for the user: each message says what happened and what to do."""


class WorkbenchError(Exception):
    """A problem the user can fix; the message is shown as is (no traceback)."""


class JobCancelled(Exception):
    """Raised inside a long step when its `cancelled()` callable returned True."""


class NotSaved(WorkbenchError):
    """The work finished but its result could not be saved; `result` holds it so it can still be shown."""

    def __init__(self, message: str, result: object):
        super().__init__(message)
        self.result = result


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a service manager or `kill` stopping the process): unwound and cleaned up as Ctrl-C is."""
