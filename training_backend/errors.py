"""Errors the user sees as one line: what file, what is wrong."""
from __future__ import annotations


class LesionsegError(Exception):
    """Base class; ``str(exc)`` is a complete one-line message for the user."""


class InputError(LesionsegError):
    """A file or value given by the user cannot be used.

    The message always names the file (or column/row) and the problem, e.g.
    ``"scans/a (1).png: image is RGBA; expected grey or RGB"``.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ProjectError(LesionsegError):
    """The project folder is missing, of the wrong kind, or inconsistent."""
