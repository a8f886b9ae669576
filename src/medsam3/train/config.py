"""Training configuration: dataclasses with the paper's defaults, YAML files of overrides, ``key=value``.

A run is described by one :class:`TrainConfig`. Its defaults are the Medical SAM3 recipe (PAPER.md §4);
a YAML file holds **overrides only** (nested mappings by section), and ``key=value`` arguments override
both (dotted keys: ``optim.lr_decoder=1e-4``, ``data.manifest=m.jsonl``, ``max_steps=20``). Values of
``key=value`` are parsed as YAML scalars (``1e-4``, ``true``, ``null``, ``[0.9, 0.999]``) and then checked
against the field's type. Unknown keys and values of the wrong type are :class:`~medsam3.errors.InputError`
naming the key, before anything runs. :func:`config_to_dict` gives the resolved configuration that is
saved in the run folder (``config.yaml``) and inside every checkpoint.

Resolution order: dataclass defaults < YAML file < command-line overrides.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsam3.errors import InputError
from medsam3.train.augment import AugmentSettings

MODES = ("full", "decoder", "lora")
PRECISIONS = ("auto", "bf16", "fp16", "no")
LOSS_KINDS = ("sam3", "simple")
LOSS_PRESETS = ("default", "sam3", "medical_sam3_public")
EXPORTS = ("best", "final", "both", "none")
MODEL_KINDS = ("image", "video")
TRACK_LOSSES = ("default", "v2", "sam2")
VIDEO_VALIDATION = ("track", "clips")
VERIFY = ("none", "files", "headers", "full")


@dataclass
class ModelSection:
    """Which SAM3 to start from and how to run it.

    Attributes:
        source: ``"tiny"`` / ``"small"`` (random weights, :mod:`medsam3.model.configs`, seeded by
            ``TrainConfig.seed``), or a folder / Hub id in the transformers layout (a converted
            checkpoint, ``facebook/sam3``, an earlier export), loaded by ``medsam3.model.loading.load_sam3``
            (``kind: video``: ``load_sam3_video``; the folder must hold a video model).
        kind: ``image`` (``Sam3Model`` trained on slices) or ``video`` (``Sam3VideoModel``, detector and
            tracker, trained on clips: :class:`ClipSection`, :mod:`medsam3.train.video_model`). Video
            training runs the detector as ``--mode track`` / ``--mode clips`` run it, with Meta's
            ``[text ; CLS]`` sequence (:mod:`medsam3.model.video_meta`), so it needs ``meta_text_cls: true``
            (the default): the volume modes have no other sequence to match.
        size: keyword overrides of ``small_sam3_config`` for ``tiny`` / ``small`` (``image_size``,
            ``vit_layers``, ``num_queries``, ...).
        meta_text_cls: text-only prompts carry the geometry encoder's CLS token, as Meta's weights were
            trained and as ``medsam3 segment`` runs them (:mod:`medsam3.model.forward`).
        activation_checkpointing: recompute the ViT and text-encoder layers in the backward pass.
        dropout: probability of every dropout layer of the model during training; ``None`` keeps the
            model's own (0.1 in SAM3's geometry encoder and DETR layers).
        image_size: train at this square input size (a multiple of the patch size) instead of the
            model's own; the position embedding follows (:mod:`medsam3.model.input_size`) and the export
            takes the new size. ``None`` keeps the model's size.
    """

    source: str = "tiny"
    kind: str = "image"
    size: dict[str, Any] = field(default_factory=dict)
    meta_text_cls: bool = True
    activation_checkpointing: bool = False
    dropout: float | None = None
    image_size: int | None = None


@dataclass
class DataSection:
    """The training data: a manifest from ``medsam3 prepare`` and how items are drawn from it.

    Attributes:
        manifest: JSONL manifest (:mod:`medsam3.data.manifest`); required.
        datasets: keep only these datasets (empty: all).
        negative_fraction, temperature, group_temperature, cross_group_negatives: the sampler's settings
            (:class:`medsam3.data.sampler.SliceSampler`).
        num_workers: DataLoader worker processes (0: load in the training process).
        cache_volumes: decoded volumes kept per loading process (3D records are read once, sliced often).
        verify: checks before step 1: ``files`` (every listed file exists), ``headers`` (+ image and label
            grids agree), ``full`` (+ every label map is read and its values must be the record's labels).
        val_split: split validated on (``val``; ``train`` to measure fitting).
        val_max_items: validation items (one per image and present concept, 3D: the middle slice of the
            concept); a seeded subset when there are more. 0 disables validation.
        val_seed: seed of that subset.
        cross_group_share: with ``cross_group_negatives``, the share of negatives of images that have an
            absent concept of their own that take another group's concept instead.
        augment: training augmentation (:class:`medsam3.train.augment.AugmentSettings`; off by default).
    """

    manifest: str = ""
    datasets: list[str] = field(default_factory=list)
    negative_fraction: float = 0.2
    temperature: float = 1.0
    group_temperature: float | None = None
    cross_group_negatives: bool = False
    num_workers: int = 0
    cache_volumes: int = 4
    verify: str = "headers"
    val_split: str = "val"
    val_max_items: int = 200
    val_seed: int = 0
    cross_group_share: float = 0.0
    augment: AugmentSettings = field(default_factory=AugmentSettings)


@dataclass
class OptimSection:
    """AdamW with SAM3's per-component learning rates (see :mod:`medsam3.train.optim`).

    Attributes:
        lr_decoder: DETR decoder, segmentation (mask) head and dot-product scoring.
        lr_vision: vision encoder (ViT + FPN neck), before layer-wise decay.
        lr_text: text encoder and its projection to the detector width.
        lr_geometry: geometry (box / point) encoder.
        lr_fusion_encoder: the DETR (fusion) encoder, which the paper's list leaves out; the public
            Medical SAM3 configuration trains it at 1e-5.
        lr_tracker: the video model's tracker (memory attention, memory encoder, prompt encoder, SAM mask
            decoder, object pointers); neither paper states a tracker rate, V2 trains every part at the
            paper's rates, and the tracker's parts are decoders: the decoder rate. The tracker's FPN neck
            on the shared ViT is a vision part (``lr_vision``, like the detector's neck).
        layer_decay: ViT block ``i`` of ``L`` gets ``lr_vision * layer_decay ** (L - i)``; the patch and
            position embeddings ``layer_decay ** (L + 1)``; the rest of the vision encoder ``1``.
        weight_decay: applied to every weight except biases and LayerNorm parameters.
        grad_clip: maximum global L2 norm of the gradients (0: no clipping).
        fused: use PyTorch's fused AdamW kernel (CPU and CUDA; several times faster on the CPU).
        warmup_steps, timescale, cooldown_steps: the schedule of :func:`medsam3.train.optim.lr_factor`.
    """

    lr_decoder: float = 3e-4
    lr_vision: float = 5e-5
    lr_text: float = 5e-5
    lr_geometry: float = 1e-4
    lr_fusion_encoder: float = 1e-5
    lr_tracker: float = 3e-4
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.1
    fused: bool = True
    warmup_steps: int = 100
    timescale: int = 10
    cooldown_steps: int = 50


@dataclass
class LoraSection:
    """LoRA adapters for ``mode: lora`` (see :mod:`medsam3.train.lora`)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    vision: bool = True
    text: bool = True


@dataclass
class LossSection:
    """The training loss.

    Attributes:
        kind: ``sam3`` (:class:`~medsam3.train.losses.Sam3Loss`) or ``simple``
            (:class:`~medsam3.train.losses.SimpleSegLoss`, masks only).
        preset: ``default`` (every SAM3 term incl. matched instance masks, which inference reads),
            ``sam3`` (Meta's segmentation recipe) or ``medical_sam3_public`` (no matched-mask term).
        aux_loss: add the find losses of every earlier decoder layer.
        overrides: :class:`~medsam3.train.losses.LossConfig` fields to change (``{ce_weight: 10}``).
    """

    kind: str = "sam3"
    preset: str = "default"
    aux_loss: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClipSection:
    """Clip training of the video model (``model.kind: video``; see :mod:`medsam3.train.clips`).

    Attributes:
        length: frames per clip (V2: 8); stride: slices between frames.
        augment_per_frame: one augmentation draw per frame instead of one per clip.
        gt_init_fraction: share of clips whose tracker starts from the ground-truth mask of frame 0
            instead of the detector's top mask (0: always the detector, as V2).
        track_loss: tracker terms (:mod:`medsam3.train.losses_track`): ``default`` (V2's semantic terms
            plus SAM2's IoU and object-score terms), ``v2``, ``sam2``; ``track_loss_overrides`` changes
            :class:`~medsam3.train.losses_track.TrackLossConfig` fields.
        checkpoint_frames: recompute each tracked frame's step in the backward pass.
        val_mode: 3D validation through ``track`` or ``clips`` volume inference (Dice per volume and
            concept, averaged per dataset); ``val_clip_length`` and ``val_probes`` are those modes' settings.
        v2_settings: for ``tiny`` / ``small`` random video models, V2's inference settings (hot start off,
            ...: :func:`medsam3.model.configs.apply_v2_settings`); loaded models keep their own.
        video_settings: inference settings of the video model to set on top (names of
            :data:`medsam3.model.configs.V2_VIDEO_SETTINGS`, e.g. ``{score_threshold_detection: 0.1,
            new_det_thresh: 0.2}``), for random and loaded models alike: 3D validation runs with them and
            the export keeps them. A model trained from scratch for minutes scores its detections far
            below SAM3's thresholds (0.5 / 0.7): lower ones let its detections count.
    """

    length: int = 8
    stride: int = 1
    augment_per_frame: bool = False
    gt_init_fraction: float = 0.0
    track_loss: str = "default"
    track_loss_overrides: dict[str, Any] = field(default_factory=dict)
    checkpoint_frames: bool = False
    val_mode: str = "track"
    val_clip_length: int = 4
    val_probes: int = 5
    v2_settings: bool = True
    video_settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """One training run (defaults: the paper's recipe; see the module docstring for overrides).

    Attributes:
        mode: ``full`` (everything trains), ``decoder`` (vision and text encoders frozen), ``lora``
            (adapters on the encoders' attention / MLP layers, everything else trains).
        run_dir: run folder: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``,
            ``export/``.
        resume: ``auto`` (continue from ``run_dir/checkpoints/last.pt`` when present), ``never``, or a
            checkpoint path.
        seed: seeds model initialisation (random sources), the sample stream, dropout and box noise.
        epochs: number of epochs (``steps_per_epoch`` optimizer steps each) unless ``max_steps``.
        steps_per_epoch: default: the number of training images (2D) and foreground slices (3D)
            divided by the global batch, rounded up.
        max_steps: total optimizer steps (overrides ``epochs``).
        stop_after: end this invocation after this many steps (a checkpoint is written), e.g. to split a
            run over job slots; the run continues with ``resume: auto``.
        stop_after_minutes: likewise, end this invocation (with a checkpoint) at the first step that ends
            after this many minutes of training (wall clock, from the first step; every process stops at
            the same step). Nothing is exported until the run reaches its last step.
        batch_size: items per process and micro-batch.
        grad_accum: micro-batches per optimizer step. Global batch = batch_size x grad_accum x processes.
        mixed_precision: ``auto`` (bf16 on CUDA, fp32 elsewhere), ``bf16``, ``fp16``, ``no``.
        box_prompt_fraction: probability that an item's text prompt also gets a noisy ground-truth box.
        box_noise_std, box_noise_max: box noise: each coordinate moves by N(0, std x box side), clipped to
            ``box_noise_max`` model-input pixels.
        log_every: steps between loss logs. val_every / save_every: steps between validations /
            checkpoints (0: at the end of every epoch).
        keep_last: numbered checkpoints kept besides ``last.pt`` and ``best.pt`` (0: none).
        export: which model(s) to write with ``save_sam3`` at the end.
        tensorboard, progress: TensorBoard event files; a console progress bar.
    """

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    loss: LossSection = field(default_factory=LossSection)
    clips: ClipSection = field(default_factory=ClipSection)
    mode: str = "full"
    run_dir: str = "runs/medsam3"
    resume: str = "auto"
    seed: int = 42
    epochs: int = 10
    steps_per_epoch: int | None = None
    max_steps: int | None = None
    stop_after: int | None = None
    stop_after_minutes: float | None = None
    batch_size: int = 1
    grad_accum: int = 1
    mixed_precision: str = "auto"
    box_prompt_fraction: float = 0.0
    box_noise_std: float = 0.1
    box_noise_max: float = 20.0
    log_every: int = 10
    val_every: int = 0
    save_every: int = 0
    keep_last: int = 0
    export: str = "both"
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`InputError` for values outside their allowed range."""
        from medsam3.model.configs import V2_VIDEO_SETTINGS

        checks = [
            (self.mode in MODES, "mode", self.mode, f"one of {MODES}"),
            (self.model.kind in MODEL_KINDS, "model.kind", self.model.kind, f"one of {MODEL_KINDS}"),
            (
                self.model.kind != "video" or self.model.meta_text_cls,
                "model.meta_text_cls",
                self.model.meta_text_cls,
                "true for model.kind video (--mode track / clips always run the video detector with Meta's "
                "[text ; CLS] sequence; training without it would not match them)",
            ),
            (
                set(self.clips.video_settings) <= set(V2_VIDEO_SETTINGS),
                "clips.video_settings",
                sorted(set(self.clips.video_settings) - set(V2_VIDEO_SETTINGS)),
                f"names among {sorted(V2_VIDEO_SETTINGS)}",
            ),
            (self.clips.length >= 1, "clips.length", self.clips.length, ">= 1"),
            (self.clips.stride >= 1, "clips.stride", self.clips.stride, ">= 1"),
            (
                0.0 <= self.clips.gt_init_fraction <= 1.0,
                "clips.gt_init_fraction",
                self.clips.gt_init_fraction,
                "in [0, 1]",
            ),
            (
                self.clips.track_loss in TRACK_LOSSES,
                "clips.track_loss",
                self.clips.track_loss,
                f"one of {TRACK_LOSSES}",
            ),
            (
                self.clips.val_mode in VIDEO_VALIDATION,
                "clips.val_mode",
                self.clips.val_mode,
                f"one of {VIDEO_VALIDATION}",
            ),
            (
                self.clips.val_clip_length >= 1 and self.clips.val_probes >= 1,
                "clips.val_clip_length / clips.val_probes",
                (self.clips.val_clip_length, self.clips.val_probes),
                ">= 1",
            ),
            (
                self.mixed_precision in PRECISIONS,
                "mixed_precision",
                self.mixed_precision,
                f"one of {PRECISIONS}",
            ),
            (self.loss.kind in LOSS_KINDS, "loss.kind", self.loss.kind, f"one of {LOSS_KINDS}"),
            (self.loss.preset in LOSS_PRESETS, "loss.preset", self.loss.preset, f"one of {LOSS_PRESETS}"),
            (self.export in EXPORTS, "export", self.export, f"one of {EXPORTS}"),
            (self.data.verify in VERIFY, "data.verify", self.data.verify, f"one of {VERIFY}"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.grad_accum >= 1, "grad_accum", self.grad_accum, ">= 1"),
            (self.epochs >= 1, "epochs", self.epochs, ">= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, ">= 1"),
            (self.stop_after is None or self.stop_after >= 1, "stop_after", self.stop_after, ">= 1"),
            (
                self.stop_after_minutes is None or self.stop_after_minutes > 0,
                "stop_after_minutes",
                self.stop_after_minutes,
                "> 0",
            ),
            (
                self.steps_per_epoch is None or self.steps_per_epoch >= 1,
                "steps_per_epoch",
                self.steps_per_epoch,
                ">= 1",
            ),
            (
                0.0 <= self.box_prompt_fraction <= 1.0,
                "box_prompt_fraction",
                self.box_prompt_fraction,
                "in [0, 1]",
            ),
            (
                self.box_noise_std >= 0 and self.box_noise_max >= 0,
                "box_noise_std / box_noise_max",
                (self.box_noise_std, self.box_noise_max),
                ">= 0",
            ),
            (0.0 < self.optim.layer_decay <= 1.0, "optim.layer_decay", self.optim.layer_decay, "in (0, 1]"),
            (
                len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
                "optim.betas",
                self.optim.betas,
                "two numbers in [0, 1)",
            ),
            (
                self.optim.warmup_steps >= 0 and self.optim.cooldown_steps >= 0 and self.optim.timescale >= 1,
                "optim.warmup_steps / cooldown_steps / timescale",
                (self.optim.warmup_steps, self.optim.cooldown_steps, self.optim.timescale),
                "warm-up and cool-down >= 0, timescale >= 1",
            ),
            (self.lora.rank >= 1, "lora.rank", self.lora.rank, ">= 1"),
            (
                self.mode != "lora" or self.lora.vision or self.lora.text,
                "lora.vision / lora.text",
                (self.lora.vision, self.lora.text),
                "at least one true in lora mode",
            ),
            (self.log_every >= 1, "log_every", self.log_every, ">= 1"),
            (
                self.val_every >= 0 and self.save_every >= 0 and self.keep_last >= 0,
                "val_every / save_every / keep_last",
                (self.val_every, self.save_every, self.keep_last),
                ">= 0",
            ),
            (self.data.val_max_items >= 0, "data.val_max_items", self.data.val_max_items, ">= 0"),
            (
                0.0 <= self.data.cross_group_share <= 1.0,
                "data.cross_group_share",
                self.data.cross_group_share,
                "in [0, 1]",
            ),
            (
                not self.data.augment.problems(),
                "data.augment",
                "; ".join(self.data.augment.problems()),
                "valid amounts",
            ),
            (
                self.model.dropout is None or 0.0 <= self.model.dropout < 1.0,
                "model.dropout",
                self.model.dropout,
                "in [0, 1) or null",
            ),
            (
                self.model.image_size is None or self.model.image_size > 0,
                "model.image_size",
                self.model.image_size,
                "> 0 or null",
            ),
        ]
        for ok, key, value, expected in checks:
            if not ok:
                raise InputError(None, f"config: {key} = {value!r} is not valid; expected {expected}")
        for name, value in vars(self.optim).items():
            if name.startswith("lr_") and not value >= 0:
                raise InputError(None, f"config: optim.{name} = {value!r} must be >= 0")


# --------------------------------------------------------------------------------------------------
# parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked (and converted where lossless) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except InputError as exc:
                errors.append(exc)
        raise errors[0] if errors else InputError(None, f"config: {key} cannot be null")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise InputError(None, f"config: {key} = {value!r} must be a list")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:  # `key=null` clears a mapping (e.g. a YAML file's model.size)
            return {}
        if not isinstance(value, dict):
            raise InputError(None, f"config: {key} = {value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise InputError(None, f"config: {key} = {value!r} must be of type {_type_name(tp)}")


def _apply(obj: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in overrides.items():
        key = f"{prefix}{name}"
        if name not in names:
            known = ", ".join(sorted(names))
            raise InputError(None, f"config: unknown key {key!r} (known here: {known})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise InputError(None, f"config: {key} must be a mapping of its fields, got {value!r}")
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr_decoder=1e-4", "max_steps=5"]`` -> nested dict of YAML-parsed values."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(None, f"override {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise InputError(None, f"override {item!r}: cannot parse the value ({exc})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(None, f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of overrides (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the config file ({exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({exc})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(path, "a training config must be a YAML mapping of overrides")
    return doc


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(
    yaml_path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> TrainConfig:
    """Defaults, then the YAML file's overrides, then ``overrides``; validated.

    ``overrides`` is a list of ``key=value`` strings or a nested mapping. Relative paths in the YAML file
    (``data.manifest``, ``model.source`` when it is a folder beside the file, ``run_dir``) are taken
    relative to the current folder, as on the command line.
    """
    doc: dict[str, Any] = read_yaml(yaml_path) if yaml_path is not None else {}
    if isinstance(overrides, dict):
        doc = _merge(doc, overrides)
    elif overrides:
        doc = _merge(doc, parse_overrides(list(overrides)))
    config = TrainConfig()
    try:
        _apply(config, doc)
    except InputError as exc:
        where = f" in {yaml_path}" if yaml_path is not None else ""
        raise InputError(None, f"{exc}{where}") from None
    config.validate()
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved configuration as plain data (what ``config.yaml`` and checkpoints hold)."""
    return dataclasses.asdict(config)


def config_from_dict(doc: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict` (unknown keys are errors)."""
    config = TrainConfig()
    _apply(config, doc)
    config.validate()
    return config


def config_yaml(config: TrainConfig) -> str:
    """YAML text of the resolved configuration."""
    import yaml

    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


#: Fields that may change between a checkpoint and its resumption without changing the run.
RUN_CONTROL_KEYS = frozenset(
    {
        "resume",
        "stop_after",
        "stop_after_minutes",
        "max_steps",
        "epochs",
        "log_every",
        "val_every",
        "save_every",
        "keep_last",
        "export",
        "tensorboard",
        "progress",
        "data.num_workers",
        "data.cache_volumes",
        "data.verify",
        "data.val_max_items",
        "clips.val_mode",
        "clips.val_clip_length",
        "clips.val_probes",
        "run_dir",
    }
)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two :func:`config_to_dict` results."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if (
            isinstance(a, dict)
            and isinstance(b, dict)
            and key not in ("size", "overrides", "track_loss_overrides")
        ):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out
