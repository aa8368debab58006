"""The converter's error type: one line, naming the file and the problem."""

from __future__ import annotations


class ConvertError(ValueError):
    """Bad input or a failed write; ``str(e)`` is ``"<file>: <problem>"``."""

    def __init__(self, file: object, problem: str) -> None:
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")
