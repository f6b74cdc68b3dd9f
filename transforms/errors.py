"""Errors that are the user's to fix. The CLI prints their message as one line and exits 1;
anything else is a bug and keeps its traceback."""


class BillrunError(Exception):
    """A user-facing failure: the message says what is wrong and where."""


class InputError(BillrunError):
    """A customers, subscriptions or purchases file, or a command argument, that billrun refuses."""
