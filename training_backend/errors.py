"""Errors the user sees as one line: what file, what is wrong."""
from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters shown as escapes (``\\n``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class LesionsegError(Exception):
    """Base class; ``str(exc)`` is a complete one-line message for the user."""


class InputError(LesionsegError):
    """A file or value given by the user cannot be used.

    The message always names the file (or column/row) and the problem, e.g.
    ``"scans/a (1).png: image is RGBA; expected grey or RGB"``.
    """

    def __init__(self, path, problem: str):
        self.path = one_line(str(path))  # a path from a CSV cell may hold a line break
        self.problem = one_line(problem)
        super().__init__(f"{self.path}: {self.problem}")


class ProjectError(LesionsegError):
    """The project folder is missing, of the wrong kind, or inconsistent."""


class ConflictError(ProjectError):
    """A save was refused because the data changed since the caller read it (another window or
    process saved a newer version); nothing was written."""


class ReadOnlyError(ProjectError):
    """A project folder that cannot be written was opened for writing (open it with
    ``mode="r"`` to look at it)."""

