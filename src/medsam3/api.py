"""The one-call API: ``medsam3.segment(image, prompts, **options)``.

The model is loaded on the first call and kept for the next calls with the same ``model``, ``device`` and
``dtype`` (the last :data:`CACHED_MODELS` of them), so a loop over images loads it once. For full control
(several models, the tracker or video model given in memory) hold a :class:`~medsam3.Segmenter`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

from medsam3.predict.engine import Engine
from medsam3.predict.segmenter import PromptsLike, Segmenter
from medsam3.predict.summary import SegmentationResult

#: Loaded models kept between calls.
CACHED_MODELS = 1

_engines: OrderedDict[tuple[str | None, str, str, str | None], Engine] = OrderedDict()
_lock = threading.Lock()


def _engine(model: str | os.PathLike | None, device: str, dtype: str) -> Engine:
    key = (
        None if model is None else os.fspath(model),
        str(device),
        str(dtype),
        os.environ.get("MEDSAM3_MODEL"),
    )
    with _lock:
        if key not in _engines:
            _engines[key] = Engine.from_pretrained(key[0], device=key[1], dtype=key[2])
            while len(_engines) > CACHED_MODELS:
                _engines.popitem(last=False)
        _engines.move_to_end(key)
        return _engines[key]


def segment(
    image: Any,
    prompts: PromptsLike,
    *,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    spacing: Any = None,
    **options: Any,
) -> SegmentationResult:
    """Segment ``image`` with ``prompts`` in one call.

    Args:
        image: a file path (any format ``medsam3`` reads: PNG / JPEG / TIFF, NIfTI, NRRD, MHA, npz, a DICOM
            file or series folder), a numpy array (``(Y, X)``, ``(Y, X, 3)`` uint8, or a volume
            ``(Z, Y, X)``, with ``spacing`` in ITK order ``(x, y[, z])`` mm), a :class:`medsam3.Image`, a
            nibabel image or a SimpleITK image.
        prompts: a concept text (``"liver"``), a list of texts, or :class:`medsam3.Prompt` /
            :class:`medsam3.VolumePrompt` objects with boxes or points.
        model: model folder or Hub id (``None``: ``$MEDSAM3_MODEL``, the configured model, else the
            bundled ``medsam3-nano``).
        device, dtype: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; ``auto``, ``fp32``, ``bf16``,
            ``fp16``.
        **options: inference options (:class:`medsam3.VolumeOptions`: ``threshold``, ``window``, ``tta``,
            ``mode``, ``allow_unknown_concepts``, ...).

    A model that records the concepts it knows (``concepts.json``; the bundled ``medsam3-nano``) reports a
    prompt outside them as absent, ``reason == "unknown concept"`` with ``known_concepts`` on its label
    entry, without segmenting it; synonyms ("foetal head", "hippocampi") are matched to its concepts;
    ``allow_unknown_concepts=True`` segments every prompt.

    Returns:
        A :class:`medsam3.SegmentationResult` on the input's grid: ``.label_map``, ``.labels``,
        ``.write(folder)``, ``.to_nibabel()``, ``.to_sitk()``.

    Raises:
        MedSam3Error: an unreadable input, an invalid prompt or option, a model that cannot be loaded.
    """
    return Segmenter(_engine(model, device, dtype)).segment(image, prompts, spacing=spacing, **options)
