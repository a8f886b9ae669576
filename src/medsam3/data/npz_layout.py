"""The CVPR BiomedSegFM ``.npz`` layout (also written by MedSAM2 and Medical SAM3's 3D recipe).

Each file holds ``imgs`` (3D ``(D, H, W)`` uint8, already windowed; 2D ``(H, W, 3)``), ``gts`` (label map of
the same spatial shape; missing in test files), ``spacing`` and optionally ``direction``, ``origin`` and
``text_prompts``. Label names come, in order of precedence, from:

1. ``--labels`` given by the user;
2. a prompts JSON (the challenge's ``CVPR25_TextSegFMData_with_class.json`` form)::

       {"CT_AbdomenCT-1K": {"1": ["liver", "liver in abdominal CT"], "2": "...", "instance_label": 0}}

   looked up by the file's folder names (nearest first), then by the longest key that prefixes the file name;
3. ``text_prompts`` stored inside the file (``{"1": "liver", "instance_label": 0}``), read by
   :func:`medsam3.io.npz.load_text_prompts`, whose unpickler only admits plain containers, strings and
   numbers (never arbitrary objects).

``instance_label: 1`` marks instance maps (every id > 0 is one object of the single named concept).
The first prompt of a label is its name; all prompts are kept in the record for prompt variety.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsam3.data.discovery import Candidate, Discovery
from medsam3.errors import InputError
from medsam3.io.npz import instance_flag, load_text_prompts

_PREFIX_MODALITY = {
    "ct": "CT",
    "mr": "MR",
    "mri": "MR",
    "pet": "PT",
    "pt": "PT",
    "us": "US",
    "microscopy": "MICROSCOPY",
    "micro": "MICROSCOPY",
    "x-ray": "XR",
    "xray": "XR",
    "xr": "XR",
    "endoscopy": "RGB",
    "dermoscopy": "RGB",
    "fundus": "RGB",
    "oct": "OTHER",
}


def modality_from_filename(name: str) -> str:
    """``CT_Lesion_000001.npz`` -> ``CT``: the BiomedSegFM file-name prefix, ``OTHER`` if unknown."""
    return _PREFIX_MODALITY.get(Path(name).name.split("_")[0].lower(), "OTHER")


def read_text_prompts(path: str | Path) -> dict[str, Any] | None:
    """The ``text_prompts`` entry of an npz file as a plain dict (phrasing lists kept), or None when absent.

    Read by :func:`medsam3.io.npz.load_text_prompts`, the package's one (restricted) reader of this entry.
    """
    path = Path(path)
    value = load_text_prompts(path)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InputError(path, "text_prompts is a string that is not JSON") from None
    if not isinstance(value, Mapping):
        raise InputError(path, f"text_prompts is a {type(value).__name__}, expected a mapping")
    return {str(k): v for k, v in value.items()}


def parse_prompt_entry(
    entry: Mapping[str, Any], source: str | Path
) -> tuple[dict[int, str], dict[int, list[str]], bool]:
    """``{"1": ["liver", ...], "instance_label": 0}`` -> (value -> name, value -> prompts, is_instance)."""
    names: dict[int, str] = {}
    prompts: dict[int, list[str]] = {}
    instance = instance_flag(entry.get("instance_label", 0), source)
    for key, val in entry.items():
        if key == "instance_label":
            continue
        try:
            value = int(key)
        except ValueError:
            raise InputError(source, f"prompt key {key!r} is not a label value") from None
        texts = [val] if isinstance(val, str) else [str(v) for v in val]
        if not texts or not texts[0].strip():
            raise InputError(source, f"label {value} has no text prompt")
        if value != 0:
            names[value], prompts[value] = texts[0], texts
    return names, prompts, instance


def _prompt_entry(table: Mapping[str, Any], rel: Path) -> tuple[str, Mapping[str, Any]] | None:
    for folder in reversed(rel.parts[:-1]):
        if folder in table:
            return folder, table[folder]
    keys = sorted((k for k in table if rel.name.startswith(k)), key=len, reverse=True)
    return (keys[0], table[keys[0]]) if keys else None


def discover_npz(root: Path, options: Mapping, labels, modality) -> Discovery:
    pattern = options.get("pattern", "**/*.npz")
    table: Mapping[str, Any] = {}
    table_path = options.get("prompts")
    if table_path:
        table_path = Path(table_path) if Path(table_path).is_absolute() else root / table_path
        try:
            table = json.loads(Path(table_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(table_path, f"cannot read the prompts JSON ({exc})") from None
    image_key, label_key = options.get("image_key", "imgs"), options.get("label_key", "gts")
    found = Discovery("npz", [])
    for path in sorted(p for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root)
        try:
            with zipfile.ZipFile(path) as zf:
                members = set(zf.namelist())
        except (OSError, zipfile.BadZipFile) as exc:
            raise InputError(path, f"not a readable npz file ({exc})") from None
        if f"{image_key}.npy" not in members:
            raise InputError(path, f"the npz file has no {image_key!r} array")
        if f"{label_key}.npy" not in members:
            found.skipped.append(f"{rel.as_posix()}: no {label_key!r} array (a test case?)")
            continue
        subset = rel.parts[-2] if len(rel.parts) > 1 else ""
        instance = False
        prompts: dict[int, list[str]] = {}
        if labels:
            names = dict(labels)
        else:
            hit = _prompt_entry(table, rel) if table else None
            entry = hit[1] if hit else read_text_prompts(path)
            if hit:
                subset = hit[0]
            if entry is None:
                raise InputError(
                    path,
                    "no label names: no text_prompts in the file and no prompts JSON entry; "
                    'give --labels map.json (e.g. {"1": "lesion"}) or --prompts',
                )
            names, prompts, instance = parse_prompt_entry(entry, path)
        mask: dict[str, Any] = {"mode": "values"}
        if instance:
            if len(names) != 1:
                raise InputError(path, f"instance_label is set but {len(names)} labels are named")
            mask = {"mode": "instances", "value": next(iter(names))}
        case = rel.as_posix()[: -len(".npz")]
        mod = modality or options.get("modality") or modality_from_filename(path.name)
        found.candidates.append(
            Candidate(
                case,
                [path],
                [path],
                names,
                mask,
                mod,
                instances=instance,
                prompts=prompts,
                source={"subset": subset, "image_key": image_key, "label_key": label_key},
            )
        )
    return found
