"""Errors meant for the user: each message says what happened and what to do."""

import errno
import os

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


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


def write_errno(error: BaseException) -> int | None:
    """The errno of a write that failed for want of space or permission, else None.

    Native writers (torch's ONNX exporter, ONNX Runtime) raise their own errors with the system's text in them.
    """
    if isinstance(error, OSError):
        return error.errno if error.errno in DISK_FULL + READ_ONLY else None
    return next((code for code in DISK_FULL + READ_ONLY if os.strerror(code) in str(error)), None)
