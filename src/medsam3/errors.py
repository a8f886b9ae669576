"""Exceptions raised for user-facing problems.

Every error a user can cause (bad file, bad prompt, bad checkpoint) is a :class:`MedSam3Error` whose
message names the file or value and says what is wrong. The CLI prints the message (no traceback) and
exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class MedSam3Error(Exception):
    """A problem with the user's input, named in the message."""


class InputError(MedSam3Error):
    """An input file or folder cannot be read or is not valid for the task."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class OutputError(MedSam3Error):
    """An output cannot be written (would overwrite an input, unwritable folder, ...)."""


class ModelError(MedSam3Error):
    """A model or checkpoint cannot be found, loaded or converted."""


class PromptError(MedSam3Error):
    """A prompt (text, box or point) is empty or invalid for the image."""


class OptionError(PromptError):
    """An inference option, or a combination of options and prompts, is not valid (a kind of prompt error:
    options are part of what a request asks)."""
