"""The one exception type that reaches the user as a one-line message (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a profile value, a path, a model or task name.

    The message is one line and says what is wrong, where, and how to fix it. The CLI prints it
    without a traceback and exits with code 2.
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors are often paragraphs), or its type."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
