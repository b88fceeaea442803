"""The one exception type that reaches the user as a one-line message (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a profile value, a path, a model or task name.

    The message is one line and says what is wrong, where, and how to fix it. The CLI prints it
    without a traceback and exits with code 2.
    """


def one_line(err: BaseException, limit: int = 240) -> str:
    """A library exception's message on one line (they are often paragraphs whose first line ends
    in "one of:"), shortened to `limit` characters; its type when it has no message."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    if not text:
        return type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
