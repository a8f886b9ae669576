"""Presets applied to a call's options once the model is known (``fast``: :data:`~.options.FAST`).

:func:`apply_presets` is the first step of :func:`~medsam3.predict.segment_2d.segment_image` and
:func:`~medsam3.predict.volume.segment.segment_volume`: it turns ``fast=True`` into the option values the
preset stands for (coarse slice search, a probe every 20 mm, the image model at 2/3 of its input side) for
this engine's model, leaving every option the caller set to a non-default value as given
(:func:`~medsam3.predict.options.expand_preset`). The result's settings carry what it did under
``"preset"``, so a run with ``--fast`` states the exact settings it ran with.
"""

from __future__ import annotations

from typing import Any, TypeVar

from medsam3.model.input_size import reduced_input_size
from medsam3.predict.engine import Engine
from medsam3.predict.options import PRESETS, SegmentOptions, expand_preset

_O = TypeVar("_O", bound=SegmentOptions)


def preset_input_size(engine: Engine, scale: float) -> int | None:
    """The input size a preset scaling by ``scale`` gives ``engine``'s image model (``None``: none
    smaller)."""
    return reduced_input_size(engine.model, scale)


def apply_presets(engine: Engine, options: _O, *, volume: bool = True) -> tuple[_O, dict[str, Any] | None]:
    """``options`` with the presets they switch on expanded for ``engine``'s model, and the ``"preset"``
    settings of the result (``None`` when no preset is on); ``volume``: whether a volume is segmented (a 2D
    image gets only the presets' 2D options).

    Raises:
        OptionError: the expanded options break a rule (:data:`~medsam3.predict.options.RULES`).
    """
    report = None
    for preset in PRESETS.values():
        if not getattr(options, preset.name, False):
            continue
        size = None if preset.input_scale is None else preset_input_size(engine, preset.input_scale)
        options, report = expand_preset(options, preset, size, volume=volume)
        if report is not None:
            report["why"] = {k: v for k, v in preset.why.items() if k in report["set"]}
    return options, report
