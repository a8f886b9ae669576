"""Inference options, each declared once: type, default, allowed values, help text, and the rules
between them.

Every front end is generated from the declarations here:

* Python: :class:`SegmentOptions` (2D images) and :class:`VolumeOptions` (its volume extension), frozen
  dataclasses checked on construction; ``Segmenter(**options)`` and ``medsam3.segment(..., **options)``;
* the command line: :func:`medsam3.commands.inference_options.add_option_arguments` turns the fields into
  the argparse options of ``medsam3 segment`` and ``medsam3 evaluate``;
* HTTP: :func:`medsam3.serve.schemas` builds the pydantic request model's option fields from them.

A field is declared with :func:`option`, whose :class:`OptionInfo` says which front ends show it
(:data:`FRONTS`), its command-line flag, range and choices. Defaults live in the dataclass fields; the one
front end with another default (``medsam3 evaluate`` scores without the presence gate, as the paper's
scripts do) names it in :data:`FRONT_DEFAULTS`.

Rules between options (and between options and the request: point prompts, a volume) are
:data:`RULES`; :func:`check_request` applies them, so the CLI, the API and Python give the same message for
the same invalid combination. Every problem raises :class:`~medsam3.errors.OptionError`.

A **preset** is a named bundle of option values, switched on by one boolean option (``fast``:
:data:`FAST`). The options keep what the caller gave; the bundle is expanded when the model is known
(:func:`expand_preset`, called by :func:`medsam3.predict.fast.apply_presets`), because part of it (the
input size) is relative to the model. An option the caller set to anything but its default wins over the
preset's value; an option at its default takes the preset's value (a value equal to the default cannot
be told from one left out). The result's settings list what the preset set and what the caller kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from medsam3.errors import OptionError
from medsam3.image import MODALITIES

#: Front ends an option can appear in: ``medsam3 segment``, ``medsam3 evaluate``, the HTTP API, and
#: ``medsam3 serve`` (the server's defaults for requests that leave the option out).
FRONTS = ("segment", "evaluate", "api", "serve")
#: Defaults that differ for one front end: front -> option -> default.
FRONT_DEFAULTS: Mapping[str, Mapping[str, Any]] = {"evaluate": {"presence_threshold": 0.0}}
#: Volume modes: detection on every slice, SAM3's video tracker, or Medical SAM3 V2's independent clips.
MODES = ("slices", "track", "clips")
#: Intensity rules: medsam3's modality-aware windowing, or V2's per-slice min-max.
INTENSITIES = ("auto", "minmax")
#: Slicing axes of the canonical (LPS) volume.
AXES = (0, 1, 2)
#: Slice searches of slices mode (:mod:`medsam3.predict.volume.search`): every slice, or coarse to fine.
SEARCHES = ("full", "coarse")


@dataclass(frozen=True)
class Preset:
    """A named bundle of option values (module docstring).

    Attributes:
        name: the boolean option that switches it on (``fast``).
        values: option name -> the preset's value (model-independent values).
        input_scale: the image model's input size times this, rounded to the patch grid
            (:func:`medsam3.model.input_size.reduced_input_size`), becomes ``image_size``; ``None``: the
            preset leaves the input size alone.
        why: one line per setting, for the docs and the result's settings.
    """

    name: str
    values: Mapping[str, Any]
    input_scale: float | None
    why: Mapping[str, str]

    @property
    def names(self) -> tuple[str, ...]:
        """The options the preset sets (``image_size`` when it scales the input)."""
        return (*self.values, *(("image_size",) if self.input_scale is not None else ()))


#: ``--fast``: fewer encoder passes (coarse slice search, probes every 20 mm) on smaller inputs (2/3 of the
#: model's side, 0.44x the ViT tokens). Measured in ``benchmarks/results/fast_cpu.md``; the precision is not
#: part of it (``--dtype`` is chosen when the model is loaded: bf16 is already the default on CUDA, and
#: ``--dtype int8`` on the CPU can be added to it).
FAST = Preset(
    name="fast",
    values={"search": "coarse", "search_step_mm": 20.0},
    input_scale=2 / 3,
    why={
        "search": "coarse-to-fine slice search: the encoder runs only around the probes where the concept is "
        "present (volumes, slices mode)",
        "search_step_mm": "a probe every 20 mm: structures thinner than 20 mm lying between two probes can "
        "be missed (give --search-step-mm for small ones)",
        "image_size": "the image model at 2/3 of its input side (0.44x the ViT tokens): coarser masks",
    },
)
#: The presets, by the name of their option.
PRESETS: Mapping[str, Preset] = {FAST.name: FAST}


@dataclass(frozen=True)
class OptionInfo:
    """How one option is shown and checked.

    Attributes:
        help: one line for ``--help``, the API schema and docs (the default is appended where shown).
        fronts: the front ends that offer it (:data:`FRONTS`); empty: Python only.
        low, high: inclusive bounds for numbers.
        choices: allowed values.
        metavar: the placeholder in ``--help``.
        parse: command-line text -> value (e.g. ``auto`` -> ``None`` for the axis); default: the type.
        negatable: a boolean that defaults to on gets ``--no-<flag>``.
    """

    help: str
    fronts: tuple[str, ...] = FRONTS
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    negatable: bool = False


def option(default: Any, help: str, **info: Any) -> Any:
    """A dataclass field carrying its :class:`OptionInfo` (``field(metadata={"option": ...})``)."""
    return field(default=default, metadata={"option": OptionInfo(help=help, **info)})


def _axis(text: str) -> int | None:
    if text == "auto":
        return None
    if text in ("0", "1", "2"):
        return int(text)
    raise OptionError(f"axis {text!r}: expected auto, 0 (axial), 1 (coronal) or 2 (sagittal)")


def _upper(text: str) -> str:
    return text.upper()


@dataclass(frozen=True)
class SegmentOptions:
    """How an image is segmented (per call; the model is loaded once). Checked on construction.

    The paper's rule: per prompt the highest-confidence mask whose confidence ``sigmoid(logit) x presence``
    exceeds ``threshold``, gated by the presence probability (``presence_threshold``).
    """

    threshold: float = option(
        0.1, "score threshold: a mask is kept when sigmoid(logit) x presence exceeds it", low=0.0, high=1.0
    )
    presence_threshold: float = option(
        0.5, "a prompt whose presence probability is below this is reported absent", low=0.0, high=1.0
    )
    modality: str | None = option(
        None, "override the guessed modality", choices=MODALITIES, fronts=("segment", "api"), parse=_upper
    )
    window: str | None = option(
        None,
        "CT window for every prompt: abdomen, liver, lung, mediastinum, bone, brain or WIDTH,LEVEL "
        "(default: chosen from each prompt's concept, else abdomen)",
        fronts=("segment", "api"),
    )
    instances: bool = option(
        False,
        "2D: keep every instance above the threshold (one label each) instead of one mask per prompt",
        fronts=("segment", "evaluate", "api"),
    )
    tta: bool = option(
        False,
        "test-time mirroring: also segment the image (each slice of a volume) "
        "mirrored along x, y and both, and average the four predictions (4x the model work; "
        "concepts naming a side or position are not mirrored)",
        fronts=("segment", "evaluate", "api"),
    )
    image_size: int | None = option(
        None,
        "run the image model at this square input size (a multiple of its "
        "patch size, e.g. 672 for a 1008 px SAM3 on a CPU: faster, coarser; "
        "default: the model's own)",
        fronts=("segment", "evaluate"),
        low=1,
        metavar="PX",
    )
    prompt_batch_size: int = option(
        8,
        "prompts (or slice x prompt rows) run together on cached image features; memory grows with it",
        fronts=(),
        low=1,
    )
    meta_text_cls: bool = option(
        True,
        "text-only prompts use Meta's prompt sequence (text tokens and the geometry encoder's CLS token)",
        fronts=(),
    )
    fast: bool = option(
        False,
        "preset: coarse slice search with a probe every 20 mm, and the image model at 2/3 of its input size "
        "(fewer, cheaper encoder passes; slightly coarser masks, structures thinner than 20 mm can be "
        "missed); options given with other values win; the settings it chose are in the result",
        fronts=("segment", "evaluate", "api"),
    )
    allow_unknown_concepts: bool = option(
        False,
        "segment prompts outside the concepts the model records (its concepts.json) anyway; without it they "
        "are reported absent with the reason 'unknown concept' (models that record none take any prompt)",
        fronts=("segment", "evaluate", "api"),
    )
    allow_out_of_domain: bool = option(
        False,
        "segment known concepts on images unlike the ones the model learnt them on; without it, a model that "
        "records its training domain (domain.safetensors) reports such a concept absent with the reason "
        "'outside the training domain'",
        fronts=("segment", "evaluate", "api"),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            info = f.metadata.get("option")
            if info is not None:
                object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), f.type, info))
        check_request(self)

    def replace(self: _O, **changes: Any) -> _O:
        """A copy with ``changes`` (checked like a new instance)."""
        return build_options(type(self), self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_O = TypeVar("_O", bound=SegmentOptions)


@dataclass(frozen=True)
class VolumeOptions(SegmentOptions):
    """:class:`SegmentOptions` plus how volumes are cut into slices and post-processed in 3D."""

    mode: str = option(
        "slices",
        "slices: detection on every slice; track: SAM3's video tracker; clips: Medical SAM3 V2's recipe "
        "(the video model on independent clips of --clip-length slices, forward only, classes fused "
        "pixel by pixel)",
        choices=MODES,
        fronts=("segment",),
    )
    axis: int | None = option(
        None,
        "canonical axis to slice along: 0 axial, 1 coronal, 2 sagittal (auto: the acquisition's slice axis)",
        choices=AXES,
        fronts=("segment",),
        metavar="auto|0|1|2",
        parse=_axis,
    )
    slice_batch: int = option(
        4, "slices encoded together (memory grows with it)", low=1, metavar="N", fronts=("segment",)
    )
    min_slices: int = option(
        1, "a concept found on fewer slices is absent", low=1, metavar="K", fronts=("segment", "api")
    )
    min_component_voxels: int = option(
        0,
        "drop 3D components smaller than N voxels (0: keep all)",
        low=0,
        metavar="N",
        fronts=("segment", "api"),
    )
    min_component_ml: float = option(
        0.0,
        "drop 3D components smaller than ML millilitres",
        low=0.0,
        metavar="ML",
        fronts=("segment", "api"),
    )
    keep_largest: bool = option(
        False, "keep only each concept's largest 3D component", fronts=("segment", "api")
    )
    fill_holes: bool = option(
        True, "fill holes enclosed within a slice", negatable=True, fronts=("segment", "api")
    )
    max_hole_pixels: int | None = option(
        None,
        "fill only holes of at most N pixels (default: any enclosed hole)",
        low=1,
        metavar="N",
        fronts=("segment", "api"),
    )
    search: str = option(
        "full",
        "slices mode: full runs the image model on every slice; coarse probes every --search-step-mm and "
        "searches slice by slice around the probes where the concept's presence passes (fewer encoder "
        "passes; the same result whenever each run of slices where presence passes holds a probe: "
        "structures thinner than the step between probes can be missed)",
        choices=SEARCHES,
        fronts=("segment", "evaluate", "api"),
    )
    search_step_mm: float = option(
        10.0,
        "search coarse: distance between probed slices in mm (at least one slice; smaller finds thinner "
        "structures)",
        low=1e-3,
        metavar="MM",
        fronts=("segment", "evaluate", "api"),
    )
    probes: int = option(
        8, "track mode: slices probed for each concept's start slice", low=1, metavar="N", fronts=("segment",)
    )
    clip_length: int = option(
        4, "clips mode: slices per clip (V2: 4)", low=1, metavar="L", fronts=("segment",)
    )
    clip_post_process: bool = option(
        False,
        "clips mode: also apply the 3D post-processing (min slices, hole filling, component filters); V2 "
        "applies none",
        fronts=("segment",),
    )
    intensity: str = option(
        "auto",
        "auto: modality-aware windowing (CT windows, MR percentiles); minmax: V2's rule, uint8 slices as "
        "stored and others min-max scaled per slice (clips and track modes)",
        choices=INTENSITIES,
        fronts=("segment",),
    )


def option_fields(
    cls: type[SegmentOptions] = VolumeOptions, front: str | None = None
) -> list[tuple[dataclasses.Field, OptionInfo]]:
    """The fields of ``cls`` with their :class:`OptionInfo`, in declaration order; only those offered by
    ``front`` when given."""
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get("option")
        if info is not None and (front is None or front in info.fronts):
            out.append((f, info))
    return out


def option_names(cls: type[SegmentOptions] = VolumeOptions) -> list[str]:
    return [f.name for f, _ in option_fields(cls)]


def default_of(name: str, front: str | None = None) -> Any:
    """The default of option ``name`` (for ``front``, when it has its own)."""
    if front is not None and name in FRONT_DEFAULTS.get(front, {}):
        return FRONT_DEFAULTS[front][name]
    for f, _ in option_fields():
        if f.name == name:
            return f.default
    raise OptionError(f"unknown option {name!r}")


def _kind(annotation: Any) -> str:
    text = str(annotation)
    for kind in ("bool", "int", "float", "str"):
        if text.startswith(kind):
            return kind
    raise TypeError(f"option type {annotation!r} is not supported")


def check_value(name: str, value: Any, annotation: Any, info: OptionInfo) -> Any:
    """``value`` converted to the option's type and checked against its range and choices."""
    if value is None:
        if "None" in str(annotation):
            return None
        raise OptionError(f"{name} needs a value")
    kind = _kind(annotation)
    if info.parse is not None and isinstance(value, str) and kind != "str":
        value = info.parse(value)
        if value is None:
            return None
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
        elif kind == "int":
            if isinstance(value, str):
                value = int(value.strip())
            if isinstance(value, bool) or int(value) != value:
                raise TypeError
            value = int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
            if not math.isfinite(value):
                raise OptionError(f"{name} must be a finite number, got {value}")
        else:
            value = str(value)
            if info.parse is not None:
                value = info.parse(value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a{'n' if kind == 'int' else ''} {kind}, got {value!r}") from None
    if info.low is not None and value < info.low or info.high is not None and value > info.high:
        if info.high is None:
            raise OptionError(f"{name} must be at least {info.low:g}, got {value:g}")
        raise OptionError(f"{name} must be between {info.low:g} and {info.high:g}, got {value:g}")
    if info.choices is not None and value not in info.choices:
        raise OptionError(f"{name} must be one of {', '.join(map(str, info.choices))}, got {value!r}")
    return value


@dataclass(frozen=True)
class Rule:
    """A combination that is refused: ``applies(options, points, volume)`` -> ``message``."""

    applies: Callable[[SegmentOptions, bool, bool], bool]
    message: str


#: Why test-time mirroring refuses a combination (one mask per prompt is what it averages).
_TTA = "tta (test-time mirroring) keeps one mask per text or box prompt and cannot be combined with "

RULES: tuple[Rule, ...] = (
    Rule(lambda o, points, volume: o.tta and o.instances, _TTA + "instances"),
    Rule(lambda o, points, volume: o.tta and points, _TTA + "point prompts"),
    Rule(lambda o, points, volume: o.tta and getattr(o, "mode", "slices") == "track", _TTA + "mode track"),
    Rule(lambda o, points, volume: o.tta and getattr(o, "mode", "slices") == "clips", _TTA + "mode clips"),
    Rule(
        lambda o, points, volume: o.image_size is not None and getattr(o, "mode", "slices") == "track",
        "image_size cannot be combined with mode track: the video model runs at its own input size",
    ),
    Rule(
        lambda o, points, volume: o.image_size is not None and getattr(o, "mode", "slices") == "clips",
        "image_size cannot be combined with mode clips: the video model runs at its own input size",
    ),
    Rule(
        lambda o, points, volume: (
            getattr(o, "intensity", "auto") == "minmax" and getattr(o, "mode", "slices") == "slices"
        ),
        "intensity minmax (V2's per-slice rule) is for modes clips and track",
    ),
    Rule(
        lambda o, points, volume: (
            getattr(o, "search", "full") == "coarse" and getattr(o, "mode", "slices") != "slices"
        ),
        "search coarse is for mode slices: modes track and clips run the video model on every slice",
    ),
    Rule(
        lambda o, points, volume: o.fast and getattr(o, "mode", "slices") != "slices",
        "fast is for mode slices and 2D images: modes track and clips run the video model on every slice at "
        "its own input size",
    ),
    Rule(
        lambda o, points, volume: o.instances and volume,
        "instances is for 2D images: a volume gets one label per prompt",
    ),
)


def check_request(options: SegmentOptions, *, points: bool = False, volume: bool = False) -> None:
    """Apply :data:`RULES` to ``options`` for a request with ``points`` (point prompts) on a ``volume``.

    Raises:
        OptionError: the first rule that refuses the combination.
    """
    for rule in RULES:
        if rule.applies(options, points, volume):
            raise OptionError(rule.message)


def build_options(cls: type[_O], base: SegmentOptions | None = None, **changes: Any) -> _O:
    """``cls`` from the fields of ``base`` (if any) and ``changes``; names ``cls`` lacks are refused."""
    known = set(option_names(cls))
    unknown = sorted(set(changes) - known)
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r}; options: {', '.join(option_names(cls))}")
    values = {k: v for k, v in (base.to_dict() if base is not None else {}).items() if k in known}
    values.update(changes)
    return cls(**values)


def expand_preset(
    options: _O, preset: Preset, input_size: int | None, *, volume: bool = True
) -> tuple[_O, dict[str, Any] | None]:
    """``options`` with ``preset`` applied, and what it did; unchanged (and ``None``) when it is off.

    Args:
        options: the caller's options (``getattr(options, preset.name)`` switches the preset on).
        preset: e.g. :data:`FAST`.
        input_size: the preset's input size for this model (``None``: the model cannot run smaller; the
            input size is then left alone).
        volume: whether a volume is segmented (on a 2D image the options only volumes have are not set).

    Returns:
        The options to run with, and the ``"preset"`` settings of a result: ``name``, ``set`` (option ->
        value the preset gave it), ``kept`` (option -> the caller's value, given instead of the preset's),
        ``not_applied`` (option -> why not: an option of volumes on a 2D image, no smaller input size).
    """
    if not getattr(options, preset.name, False):
        return options, None
    fields = {f.name: f for f in dataclasses.fields(options if volume else SegmentOptions)}
    wanted: dict[str, Any] = dict(preset.values)
    not_applied: dict[str, str] = {}
    if preset.input_scale is not None:
        if input_size is None:
            not_applied["image_size"] = "the model has no smaller input size on its patch grid"
        else:
            wanted["image_size"] = int(input_size)
    changes: dict[str, Any] = {}
    kept: dict[str, Any] = {}
    for name, value in wanted.items():
        if name not in fields:
            not_applied[name] = "an option of volumes (this is a 2D image)"
            continue
        given = getattr(options, name)
        if given != fields[name].default:
            kept[name] = given
        else:
            changes[name] = value
    report = {"name": preset.name, "set": changes, "kept": kept, "not_applied": not_applied}
    return (options.replace(**changes) if changes else options), report
