"""Reading user-supplied JSON files with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medsam3.errors import InputError


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse the JSON file at ``path``; a missing or malformed file raises :class:`InputError`.

    ``what`` names the file's role in the message (``"label map file"``, ``"vocabulary file"``).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, f"{what} not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the {what} ({exc})") from None
