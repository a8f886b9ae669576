"""The BiomedSegFM / MedSAM ``.npz`` case layout.

Keys (as in the CVPR BiomedSegFM challenge data and MedSAM2's RECIST set):

* ``imgs``: image, 3D ``(D, H, W)`` = array order ``(Z, Y, X)``, or 2D ``(H, W)`` / ``(H, W, 3)``;
* ``gts``: reference labels on the same grid (optional); predictions use ``segs`` instead;
* ``spacing``: voxel size in **ITK order** ``(x, y, z)``, as ``SimpleITK.GetSpacing()`` gives it. This was
  checked on the real files: MedSAM2's DeepLesion crops store ``(0.31, 0.31, 5.0)`` for 16 slices of
  512 x 512, i.e. in-plane pixel size first and the 5 mm slice step last, and the challenge's own
  npz -> NIfTI converters pass ``spacing`` unchanged to ``SetSpacing`` of ``GetImageFromArray(imgs)``;
* ``direction``: 9 (or 4) values, the row-major flattening of the ITK direction matrix
  (``SimpleITK.GetDirection()``), LPS;
* ``origin``: ITK order, LPS mm;
* ``text_prompts`` (optional): label value -> text. Stored by the challenge as a pickled dict (0-d object
  array, keys are label values as strings, an ``instance_label`` flag 0 / 1 may be present, e.g.
  ``{"1": "CT imaging of the spleen within the abdomen", "instance_label": 0}``). It is unpickled by
  :func:`load_text_prompts`, the one reader of this entry in the package: a restricted unpickler that admits
  only plain containers, strings and numbers (and what numpy needs to rebuild a 0-d object array), never
  arbitrary objects or callables. A JSON string (0-d unicode array) and a 1-D string array (value ``i + 1``
  for item ``i``) are also read. :func:`parse_text_prompts` turns any of these forms into
  :class:`TextPrompts` (label ids ``str(int(key))`` > 0, texts stripped and non-empty, ``instance_label``);
* ``label_names`` (written by this package): JSON ``{"value": "name"}`` in a 0-d unicode array.

Files are opened with ``allow_pickle=False``; only ``text_prompts`` may go through the restricted
unpickler. Missing geometry defaults to 1 mm spacing, zero origin, identity direction
(``meta['spacing_known'] = False``). :func:`read_npz` puts the prompts in ``meta['text_prompts']`` (label
id -> text) and ``meta['instance_label']`` (0 / 1); prompts that are present but malformed (a key that is no
label id, an empty text) leave the image readable: ``meta['text_prompts_problem']`` says what is wrong, and
a command that needs them reads them with :func:`read_text_prompts`, which raises.

Predictions: :func:`write_npz` (``segs`` with the geometry and ``label_names``) and
:func:`write_challenge_npz` (``segs`` only, as the CVPR 2025 text-guided 3D challenge expects).
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsam3.errors import InputError
from medsam3.image import Image

log = logging.getLogger(__name__)

IMAGE_KEY, LABEL_KEYS = "imgs", ("gts", "segs")

#: The only globals a ``text_prompts`` pickle may name: numpy's rebuilding of a 0-d object array (and of
#: numpy scalars such as an ``np.int64`` flag), and plain containers / numbers / strings.
_SAFE_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("collections", "OrderedDict"),
    }
)
#: The member of an npz holding the prompts.
TEXT_PROMPTS_KEY = "text_prompts"


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global outside :data:`_SAFE_GLOBALS` (so no callable can be reached or run)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: text prompts may hold only plain dicts, lists, "
                "strings and numbers"
            )
        return super().find_class(module, name)


def _plain(value: Any) -> Any:
    """numpy arrays / scalars inside a loaded value -> plain Python (0-d arrays -> their item)."""
    if isinstance(value, np.ndarray):
        return _plain(value.item()) if value.shape == () else [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_member(data: bytes) -> Any:
    """One ``.npy`` member: an object array through the restricted unpickler, any other without pickle."""
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version in ((2, 0), (3, 0)):
        _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        return _RestrictedUnpickler(buf).load()
    buf.seek(0)
    return np.lib.format.read_array(buf, allow_pickle=False)


#: What a damaged or hostile pickle raises while being read (never code run: no callable is reachable).
_UNREADABLE = (
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    EOFError,
    KeyError,
    AttributeError,
    IndexError,
    RecursionError,
    MemoryError,
)


def load_text_prompts(path: str | Path) -> Any:
    """The raw ``text_prompts`` entry of the npz ``path`` as plain Python (dict, list, str), or ``None``
    when the file has none. The one reader of this entry (module docstring): nothing but plain values is
    ever rebuilt.

    Raises:
        InputError: naming ``path``: the entry names anything else (a class, a function: refused before it
            could run), or cannot be read.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{TEXT_PROMPTS_KEY}.npy" not in zf.namelist():
                return None
            with zf.open(f"{TEXT_PROMPTS_KEY}.npy") as fh:
                data = fh.read()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(path, f"text_prompts cannot be read ({exc})") from None
    try:
        return _plain(_read_member(data))
    except _UNREADABLE as exc:
        raise InputError(path, f"text_prompts cannot be read safely ({exc}); refusing to load it") from None


@dataclass(frozen=True)
class TextPrompts:
    """Prompts of a case: ``labels`` label id (> 0) -> text, ascending; ``instance``: the challenge's
    ``instance_label`` flag (one prompt whose mask is split into instances)."""

    labels: dict[int, str]
    instance: bool = False


def _label_id(key: Any, source: str | Path | None, what: str) -> int:
    try:
        value = int(str(key).strip())
    except ValueError:
        raise InputError(source, f"{what} key {key!r} is not a label id (an integer > 0)") from None
    if value < 0:
        raise InputError(source, f"{what} key {key!r} is negative; label ids are integers > 0")
    return value


def _prompt_text(value: Any, label: int, source: str | Path | None, what: str) -> str:
    if isinstance(value, (list, tuple)):  # phrasings, as in the challenge's training prompt table: the first
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if not isinstance(value, str):
        raise InputError(source, f"{what} label {label}: expected a text, got {type(value).__name__}")
    text = " ".join(value.split())
    if not text:
        raise InputError(source, f"{what} label {label} has an empty text")
    return text


def instance_flag(value: Any, source: str | Path | None, what: str = "text_prompts") -> bool:
    """``instance_label`` (0 / 1, also ``"0"`` / ``"1"``, booleans, ``None`` = 0) as a bool; InputError
    naming ``source`` otherwise."""
    if value is None:
        return False
    try:
        flag = int(str(value).strip()) if not isinstance(value, (bool, int)) else int(value)
    except ValueError:
        flag = -1
    if flag not in (0, 1):
        raise InputError(source, f"{what} instance_label is {value!r}; expected 0 or 1")
    return bool(flag)


def parse_text_prompts(
    value: Any, source: str | Path | None = None, what: str = "text_prompts"
) -> TextPrompts:
    """Any stored ``text_prompts`` form (module docstring), or a prompts-JSON entry, -> :class:`TextPrompts`.

    * a dict ``{"1": text, ..., "instance_label": 0|1}``: keys normalised ``str(int(key))``; label 0
      (background) is left out; a text may be a list of phrasings (the first non-empty one is used);
    * a JSON string of such a dict or list, or any other string (one prompt, label 1);
    * a list / 1-D array of texts: label ``i + 1`` for item ``i``.

    Raises:
        InputError: naming ``source``: a key that is not a label id, two keys for one id (``"1"`` and
            ``"01"``), an empty text, an ``instance_label`` other than 0 / 1, no prompt at all.
    """
    value = _plain(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = {"1": value}
        if isinstance(value, str):
            value = {"1": value}
    if isinstance(value, list):
        value = {str(i + 1): v for i, v in enumerate(value)}
    if not isinstance(value, dict):
        raise InputError(source, f"{what} is a {type(value).__name__}; expected label id -> text")
    labels: dict[int, str] = {}
    instance = False
    for key, text in value.items():
        if str(key).strip() == "instance_label":
            instance = instance_flag(text, source, what)
            continue
        label = _label_id(key, source, what)
        if label == 0:
            continue  # background
        if label in labels:
            raise InputError(source, f"{what} names label {label} twice (keys are compared as integers)")
        labels[label] = _prompt_text(text, label, source, what)
    if not labels:
        raise InputError(source, f"{what} holds no prompt (label id > 0 -> text)")
    return TextPrompts(dict(sorted(labels.items())), instance)


def read_text_prompts(path: str | Path) -> TextPrompts | None:
    """The prompts stored in the npz ``path`` (:func:`load_text_prompts` then :func:`parse_text_prompts`),
    or ``None`` when it has none. Raises :class:`InputError` naming the file."""
    value = load_text_prompts(path)
    return None if value is None else parse_text_prompts(value, path)


def _check_declared_sizes(path: Path) -> None:
    """Refuse members whose ``.npy`` headers declare more voxels than the limit (a few compressed bytes can
    declare gigabytes), before any array is allocated."""
    from medsam3.io.volumes import MAX_VOXELS_ENV, max_voxels

    limit = max_voxels()
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                        version, np.lib.format.read_array_header_2_0
                    )
                    shape = read(fh)[0]
                count = int(np.prod(shape, dtype=np.float64))  # float: no overflow on forged shapes
                if count > limit:
                    raise InputError(
                        path,
                        f"array {info.filename[:-4]!r} declares shape {tuple(shape)} = {count:,} values, "
                        f"more than the limit of {limit:,} (set {MAX_VOXELS_ENV} to read larger volumes)",
                    )
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        return  # np.load below says what is wrong with the file


def _open(path: Path) -> dict[str, Any]:
    _check_declared_sizes(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(path, f"cannot be read as a NumPy .npz archive ({exc})") from exc
    out: dict[str, Any] = {}
    with z:
        for key in z.files:
            try:
                out[key] = z[key]
            except ValueError:  # object array: only prompts are allowed through the restricted unpickler
                if key == TEXT_PROMPTS_KEY:
                    out[key] = load_text_prompts(path)
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise InputError(path, f"array '{key}' is truncated or corrupt ({exc})") from exc
    return out


def _geometry(path: Path, data: dict[str, Any], shape: tuple[int, ...], nd: int) -> tuple:
    spacing = data.get("spacing")
    known = spacing is not None
    spacing = np.ones(nd) if spacing is None else np.asarray(spacing, dtype=np.float64).ravel()
    if spacing.size != nd or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            path,
            f"has spacing {spacing.tolist()} for a {nd}D image of shape {shape}; "
            f"expected {nd} positive values (x, y[, z])",
        )
    origin = np.asarray(data.get("origin", np.zeros(nd)), dtype=np.float64).ravel()
    direction = np.asarray(data.get("direction", np.eye(nd)), dtype=np.float64).ravel()
    if origin.size != nd or direction.size != nd * nd:
        raise InputError(
            path,
            f"has origin {origin.tolist()} / direction {direction.tolist()} that do not fit a {nd}D image",
        )
    return tuple(spacing), tuple(origin), direction.reshape(nd, nd), known


def _layout(path: Path, array: np.ndarray, spacing: Any) -> tuple[int, bool]:
    """Spatial dimensions and colour flag of ``imgs``."""
    n_sp = None if spacing is None else int(np.asarray(spacing).size)
    if array.ndim == 2:
        return 2, False
    if array.ndim == 3 and array.shape[-1] in (3, 4) and n_sp != 3 and array.shape[0] > 4:
        return 2, True
    if array.ndim == 3:
        return 3, False
    raise InputError(path, f"'imgs' has shape {array.shape}; expected (D, H, W), (H, W) or (H, W, 3)")


def read_npz(path: Path) -> tuple[Image, Image | None, dict[int, str]]:
    """``(image, labels or None, text prompts)`` of a BiomedSegFM npz (see module docstring).

    The label image comes from ``gts`` (or ``segs`` when there is no ``gts``); it carries
    ``meta['label_names']`` from ``label_names`` or the text prompts.
    """
    data = _open(path)
    label_key = next((k for k in LABEL_KEYS if k in data), None)
    base_key = IMAGE_KEY if IMAGE_KEY in data else label_key
    if base_key is None:
        raise InputError(path, f"has keys {sorted(data)}; a BiomedSegFM npz holds 'imgs' (and 'gts'/'segs')")
    prompts: dict[int, str] = {}
    instance = None
    prompt_problem = None
    if TEXT_PROMPTS_KEY in data:
        try:
            parsed = parse_text_prompts(data[TEXT_PROMPTS_KEY], path)
            prompts, instance = parsed.labels, int(parsed.instance)
        except InputError as exc:  # the image is still readable; a command that needs the prompts says why
            prompt_problem = exc.problem
            log.warning("%s", exc)
    names = dict(prompts)
    if "label_names" in data:
        try:
            names.update({int(k): str(v) for k, v in json.loads(str(data["label_names"])).items()})
        except (json.JSONDecodeError, ValueError, AttributeError) as exc:
            raise InputError(path, f"'label_names' is not a JSON object ({exc})") from exc
    base = data[base_key]
    nd, colour = _layout(path, base, data.get("spacing"))
    shape = base.shape[:nd]
    spacing, origin, direction, known = _geometry(path, data, shape, nd)
    meta = {
        "path": str(path),
        "format": "npz",
        "spacing_known": known,
        "text_prompts": prompts,
        "npz_keys": sorted(data),
    }
    if instance is not None:
        meta["instance_label"] = instance
    if prompt_problem is not None:
        meta["text_prompts_problem"] = prompt_problem
    image = None
    if IMAGE_KEY in data:
        image = Image(data[IMAGE_KEY], spacing, origin, direction, "OTHER", dict(meta))
    labels = None
    if label_key is not None:
        lab = data[label_key]
        if lab.shape != shape:
            raise InputError(path, f"'{label_key}' has shape {lab.shape} but 'imgs' {base.shape}")
        if lab.dtype.kind not in "biu":
            if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
                lab = lab.astype(np.int64)
            else:
                raise InputError(path, f"'{label_key}' holds {lab.dtype} values; expected integer labels")
        labels = Image(
            lab,
            spacing,
            origin,
            direction,
            "OTHER",
            dict(meta, is_label=True, label_key=label_key, label_names=names),
        )
    if image is None:  # no 'imgs': the label map stands in for the image
        assert labels is not None
        image = labels
    return image, labels, prompts


def write_npz(labels: np.ndarray, path: Path, reference: Image, label_names: dict[int, str] | None) -> None:
    """Write ``segs`` with the reference geometry (BiomedSegFM keys) and ``label_names`` as JSON."""
    payload: dict[str, Any] = {
        "segs": labels,
        "spacing": np.asarray(reference.spacing, dtype=np.float64),
        "origin": np.asarray(reference.origin, dtype=np.float64),
        "direction": np.asarray(reference.direction, dtype=np.float64).ravel(),
    }
    if label_names:
        payload["label_names"] = np.array(json.dumps({str(k): v for k, v in sorted(label_names.items())}))
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **payload)


def write_challenge_npz(labels: np.ndarray, path: Path) -> None:
    """Write the CVPR 2025 text-guided 3D challenge's prediction file: ``segs`` only.

    ``labels``: the label map in the input's array layout (``(D, H, W)`` for a challenge case), label ids
    as the case's prompts number them (instance cases: instances ``1..K``); stored as ``uint8``, or
    ``uint16`` (``uint32``) when a value needs it. No geometry, no names: the challenge reads ``segs`` and
    takes the spacing from its own copy of the case.
    """
    from medsam3.io.readers import smallest_unsigned

    arr = np.asarray(labels)
    top = int(arr.max()) if arr.size else 0
    with open(path, "wb") as fh:
        np.savez_compressed(fh, segs=arr.astype(smallest_unsigned(top), copy=False))
