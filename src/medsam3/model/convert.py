"""Convert Meta-format SAM3 checkpoints into transformers model folders.

Accepted inputs (``torch.load(..., weights_only=True, mmap=True)``, never arbitrary unpickling):

* Meta's ``sam3.pt``: a state dict with ``detector.*`` and ``tracker.*`` keys (possibly under ``"model"``);
* Medical SAM3 / SAM3 trainer checkpoints: ``{"model": {"detector.…": …, "tracker.…": …}, "optimizer": …,
  "epoch": …}`` (everything but ``"model"`` is ignored);
* the bare state dict of Meta's image model (keys ``backbone.…``, ``transformer.…`` without ``detector.``).

With tracker keys the output is a ``Sam3VideoModel`` folder (``facebook/sam3``'s layout: ``Sam3Model``,
``Sam3TrackerModel`` and ``Sam3VideoModel`` all load it), else a ``Sam3Model`` folder. Keys are renamed and
reshaped by :mod:`medsam3.model.meta_keys`; the result is checked against the transformers model built from
the configuration (on the meta device, no memory) before anything is written, and the folder is written
atomically.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsam3.errors import ModelError, OutputError
from medsam3.model import meta_keys
from medsam3.model.loading import atomic_directory, build_processor, parse_dtype, write_safetensors

#: Top-level entries of a trainer checkpoint that may hold the model's state dict, in order of preference.
STATE_DICT_ENTRIES = ("model", "state_dict", "model_state_dict")
_IMAGE_ROOTS = ("backbone.", "transformer.", "geometry_encoder.", "segmentation_head.", "dot_prod_scoring.")


@dataclass
class ConversionReport:
    """What happened to every key of a Meta-format state dict.

    ``converted``: Meta key -> transformers key(s) and operation; ``dropped``: keys deliberately left out,
    with the reason; ``unexpected``: Meta keys no rule knows (an error); ``missing``: transformers weights
    nothing provided (an error); ``mis_shaped``: converted tensors whose shape differs from the model's (an
    error); ``ignored_entries``: checkpoint entries besides the state dict (optimizer, epoch, ...);
    ``recipe``: ``"v2"`` for a Medical SAM3 V2 conversion; ``sizes``: configuration settings changed from
    what the weights imply (input size and what depends on it, V2's settings), each with ``from``, ``to``
    and ``why``.
    """

    source: str = ""
    model_class: str = ""
    converted: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mis_shaped: list[dict[str, Any]] = field(default_factory=list)
    ignored_entries: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    output: str = ""
    recipe: str = ""
    sizes: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.mis_shaped)

    def counts(self) -> dict[str, int]:
        return {
            "converted": len(self.converted),
            "dropped": len(self.dropped),
            "unexpected": len(self.unexpected),
            "missing": len(self.missing),
            "mis_shaped": len(self.mis_shaped),
        }

    def summary(self) -> str:
        """A few human-readable lines: counts per category, then the first problems."""
        c = self.counts()
        lines = [
            f"{self.source or 'state dict'} -> {self.model_class}"
            + (f" ({self.output})" if self.output else ""),
            "  " + ", ".join(f"{k.replace('_', '-')}: {v}" for k, v in c.items()),
        ]
        reasons: dict[str, int] = {}
        for d in self.dropped:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        lines += [f"  dropped {n}: {reason}" for reason, n in reasons.items()]
        if self.recipe:
            lines.append(f"  recipe: {self.recipe}")
        lines += [f"  set {k}: {v['from']} -> {v['to']} ({v['why']})" for k, v in self.sizes.items()]
        for label, items in (
            ("unexpected", self.unexpected),
            ("missing", self.missing),
            ("mis-shaped", [f"{m['transformers']} {m['got']} vs {m['expected']}" for m in self.mis_shaped]),
        ):
            if items:
                more = f" ... ({len(items)} in all)" if len(items) > 5 else ""
                lines.append(f"  {label}: " + ", ".join(items[:5]) + more)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "counts": self.counts()}


class ConversionError(ModelError):
    """The checkpoint's keys do not convert cleanly; ``report`` says which."""

    def __init__(self, message: str, report: ConversionReport):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------------
# reading the checkpoint


def load_meta_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict inside a Meta / trainer checkpoint, and the other top-level entries it ignored.

    Loads with ``weights_only=True`` (tensors and plain containers only) and memory-maps the file.

    Raises:
        ModelError: missing or truncated file, a pickle that needs arbitrary code (refused for safety), or
            no state dict of tensors inside.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: checkpoint file not found")
    with open(p, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            raise ModelError(
                f"{p}: is gzip-compressed, not a PyTorch checkpoint; decompress it first (gunzip)"
            )
    try:
        obj = _torch_load(p)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a pickle of objects at all: garbage or another format
            raise ModelError(
                f"{p}: cannot read this checkpoint; the file is not a PyTorch checkpoint ({_reason(exc)})"
            ) from exc
        raise ModelError(
            f"{p}: refused for safety: the checkpoint contains pickled Python objects other than tensors "
            f"and plain containers, and loading them would run code from the file ({_first_line(exc)}); "
            "re-save it as a plain state dict (torch.save(model.state_dict(), ...)) with a trusted tool"
        ) from exc
    except (KeyError, IndexError, TypeError, AttributeError) as exc:  # a legacy unpickler fed other bytes
        raise ModelError(
            f"{p}: cannot read this checkpoint; the file is not a PyTorch checkpoint ({_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(
            f"{p}: cannot read this checkpoint; the file is truncated, corrupt or not a "
            f"PyTorch checkpoint ({_first_line(exc)})"
        ) from exc
    return _find_state_dict(obj, p)


def _torch_load(p: Path) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        # files written with the legacy (non-zip) serialization cannot be memory-mapped
        return torch.load(p, map_location="cpu", weights_only=True)


def _reason(exc: BaseException) -> str:
    """The error's type and first line (a bare ``KeyError: 101`` says little without its type)."""
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(obj: Any, p: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    if isinstance(obj, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if entry in obj and _is_state_dict(obj[entry]):
                return dict(obj[entry]), sorted(str(k) for k in obj if k != entry)
        if _is_state_dict(obj):
            return dict(obj), []
        seen = ", ".join(repr(k) for k in list(obj)[:8])
        raise ModelError(
            f"{p}: unknown checkpoint layout: no state dict of tensors under "
            f"{' / '.join(STATE_DICT_ENTRIES)} nor at the top level (entries seen: {seen})"
        )
    raise ModelError(f"{p}: unknown checkpoint layout: holds a {type(obj).__name__}, not a state dict")


def normalize_meta_keys(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """Bring a Meta-layout state dict to full keys (``detector.…`` / ``tracker.…``).

    A ``module.`` prefix (distributed training) is removed, and the bare keys of Meta's image model get
    ``detector.``. Raises :class:`ModelError` when the keys are of no known SAM3 layout.
    """
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
        keys = list(state_dict)
    if any(k.startswith(("detector.", "tracker.")) for k in keys):
        return dict(state_dict)
    if any(k.startswith(_IMAGE_ROOTS) for k in keys):
        return {f"detector.{k}": v for k, v in state_dict.items()}
    sample = ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else "")
    if any("lora_" in k for k in keys):
        raise ModelError(
            f"{source}: this is a LoRA adapter (keys {sample}), not a full SAM3 checkpoint; "
            "merge it into its base model first"
        )
    raise ModelError(
        f"{source}: unknown layout: these keys are not Meta's SAM3 layout (detector.* / "
        f"tracker.*) (keys seen: {sample})"
    )


# --------------------------------------------------------------------------------------------------
# converting


def _expected_shapes(config: Any) -> tuple[str, dict[str, tuple[int, ...]]]:
    """Class name and key -> shape of the transformers model for ``config`` (built on the meta device)."""
    from transformers import Sam3Model, Sam3VideoModel

    cls = Sam3VideoModel if getattr(config, "model_type", "") == "sam3_video" else Sam3Model
    with torch.device("meta"):
        model = cls(config)
    return cls.__name__, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_meta_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: Any = None,
    *,
    with_tracker: bool | None = None,
    source: str = "state dict",
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Rename and reshape a Meta-layout state dict into transformers keys.

    Args:
        state_dict: Meta keys (``detector.…`` / ``tracker.…``, or the image model's bare keys) -> tensors.
        config: ``Sam3Config`` (image model) or ``Sam3VideoConfig`` (detector + tracker); inferred from the
            tensor shapes when None (see :func:`medsam3.model.configs.infer_sam3_config`).
        with_tracker: convert the tracker too (``Sam3VideoModel`` keys); default: when the state dict has
            tracker keys and ``config`` is not an image-model configuration.

    Returns:
        The transformers state dict (tensors keep their dtype; split pieces are copies) and the report.
        Problems (unexpected, missing, mis-shaped keys) are reported, not raised.
    """
    tensors, report, _ = _convert(state_dict, config, with_tracker, source)
    return tensors, report


def _convert(
    state_dict: Mapping[str, torch.Tensor], config: Any, with_tracker: bool | None, source: str
) -> tuple[dict[str, torch.Tensor], ConversionReport, Any]:
    from medsam3.model.configs import infer_sam3_config

    meta = normalize_meta_keys(state_dict, source)
    has_tracker = any(k.startswith("tracker.") for k in meta)
    video_config = None if config is None else getattr(config, "model_type", "") == "sam3_video"
    if with_tracker is None:
        with_tracker = has_tracker if video_config is None else video_config
    if video_config is not None and video_config != with_tracker:
        raise ModelError(
            f"{source}: the configuration ({config.model_type}) does not match the requested "
            f"{'video' if with_tracker else 'image'} model"
        )
    if with_tracker and not has_tracker:
        raise ModelError(
            f"{source}: the checkpoint holds no tracker weights (tracker.*); convert it as an image model"
        )
    if config is None:
        try:
            shapes = {k: tuple(v.shape) for k, v in meta.items()}
            config = infer_sam3_config(shapes, with_tracker=with_tracker)
        except ValueError as exc:
            raise ModelError(
                f"{source}: cannot read the model architecture from the checkpoint ({exc}); "
                "pass an explicit configuration (config.json)"
            ) from exc
    model_class, expected = _expected_shapes(config)
    prefix = (
        {
            meta_keys.DETECTOR: "detector_model.",
            meta_keys.TRACKER_NECK: "tracker_neck.",
            meta_keys.TRACKER: "tracker_model.",
        }
        if with_tracker
        else {meta_keys.DETECTOR: ""}
    )
    report = ConversionReport(source=source, model_class=model_class, config=_config_summary(config))
    scan = meta_keys.prescan(k[len("tracker.") :] for k in meta if k.startswith("tracker."))
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    stacks: dict[str, list[tuple[int, str, torch.Tensor]]] = {}
    for key in sorted(meta, key=_natural):
        tensor = meta[key]
        reason = meta_keys.dropped_reason(key)
        plan = None if reason else meta_keys.plan_key(key, scan)
        if plan is not None and plan.part not in prefix:
            reason = meta_keys.TRACKER_DROP_REASON
        if reason:
            report.dropped.append({"meta": key, "reason": reason})
            continue
        if plan is None:
            report.unexpected.append(key)
            continue
        names = [prefix[plan.part] + t for t in plan.targets]
        if plan.op == "stack":
            stacks.setdefault(names[0], []).append((int(re.findall(r"\.(\d+)\.", key)[-1]), key, tensor))
            continue
        try:
            pieces = meta_keys.apply_op(plan.op, tensor, key)
        except ValueError as exc:
            report.mis_shaped.append(
                {
                    "meta": key,
                    "transformers": names[0],
                    "got": list(tensor.shape),
                    "expected": list(expected.get(names[0], ())),
                    "problem": str(exc),
                }
            )
            continue
        for name, piece in zip(names, pieces, strict=True):
            out[name], origin[name] = piece, key
        report.converted.append({"meta": key, "transformers": names, "op": plan.op})
    for name, items in stacks.items():
        items.sort()
        out[name] = torch.cat([t for _, _, t in items], dim=0)
        origin[name] = ", ".join(k for _, k, _ in items)
        report.converted += [{"meta": k, "transformers": [name], "op": "stack"} for _, k, _ in items]
    for name in sorted(set(out) - set(expected)):
        report.unexpected.append(f"{origin[name]} -> {name} (no such weight in {model_class})")
        del out[name]
    report.missing = sorted(set(expected) - set(out), key=_natural)
    for name in sorted(out, key=_natural):
        if tuple(out[name].shape) != expected[name]:
            report.mis_shaped.append(
                {
                    "meta": origin[name],
                    "transformers": name,
                    "got": list(out[name].shape),
                    "expected": list(expected[name]),
                }
            )
    return out, report, config


def _configure_size(
    tensors: dict[str, torch.Tensor],
    config: Any,
    report: ConversionReport,
    recipe: str | None,
    image_size: int | None,
    source: str,
) -> dict[str, torch.Tensor]:
    """Apply ``recipe`` / ``image_size`` to a converted video model's configuration (and, for a position
    embedding learnt over the whole grid, its weights); the report's ``sizes`` say what changed and why."""
    from medsam3.model.configs import V2_IMAGE_SIZE, apply_v2_settings, set_video_input_size
    from medsam3.model.input_size import resample_grid

    if getattr(config, "model_type", "") != "sam3_video":
        raise ModelError(
            f"{source}: --image-size and the V2 recipe apply to video models (detector + tracker)"
        )
    size = int(image_size) if image_size is not None else V2_IMAGE_SIZE
    why = (
        "given with --image-size"
        if image_size is not None
        else "Medical SAM3 V2 runs the video model at 504 px"
    )
    try:
        changed = set_video_input_size(config, size)
    except ValueError as exc:
        raise ModelError(f"{source}: {exc}") from None
    report.sizes = {k: {"from": old, "to": new, "why": why} for k, (old, new) in changed.items()}
    key = "detector_model.vision_encoder.backbone.embeddings.position_embeddings"
    if "pretrain_image_size" in changed and key in tensors:
        grid = size // int(config.detector_config.vision_config.backbone_config.patch_size)
        tensors = dict(tensors)
        tensors[key] = resample_grid(tensors[key], grid)
        report.sizes["position_embeddings"] = {
            "from": "learnt over the whole grid",
            "to": f"resampled to {grid} x {grid} (bicubic)",
            "why": why,
        }
    if recipe == "v2":
        report.sizes.update(
            {
                k: {"from": old, "to": new, "why": "Medical SAM3 V2: hot-start off, Meta's video thresholds"}
                for k, (old, new) in apply_v2_settings(config).items()
            }
        )
        report.recipe = "v2"
    return tensors


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _config_summary(config: Any) -> dict[str, Any]:
    detector = getattr(config, "detector_config", None) or config
    vit = detector.vision_config.backbone_config
    return {
        "model_type": config.model_type,
        "image_size": vit.image_size,
        "patch_size": vit.patch_size,
        "vit_width": vit.hidden_size,
        "vit_layers": vit.num_hidden_layers,
        "text_width": detector.text_config.hidden_size,
        "queries": detector.detr_decoder_config.num_queries,
    }


def _load_config_file(path: str | os.PathLike) -> Any:
    from transformers import AutoConfig

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelError(f"{p}: cannot read this model configuration ({exc})") from exc
    if config.model_type not in ("sam3", "sam3_video"):
        raise ModelError(f"{p}: model_type {config.model_type!r}; expected sam3 or sam3_video")
    return config


def convert_meta_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "fp32",
    config: Any = None,
    with_tracker: bool | None = None,
    overwrite: bool = False,
    recipe: str | None = None,
    image_size: int | None = None,
) -> ConversionReport:
    """Convert a Meta-format checkpoint file into a transformers model folder ``out_dir``.

    Args:
        dtype: ``fp32`` | ``bf16`` | ``fp16`` (or a torch dtype) for the floating-point weights.
        config: a ``Sam3Config`` / ``Sam3VideoConfig``, or the path of a ``config.json`` (or of a folder
            holding one); inferred from the tensor shapes when None.
        with_tracker: see :func:`convert_meta_state_dict`.
        overwrite: replace an existing non-empty ``out_dir`` (only once the new folder is complete).
        recipe: ``"v2"``: a Medical SAM3 V2 video checkpoint (the same ``detector.*`` / ``tracker.*`` names
            and shapes as Meta's layout, so the file cannot say it is one): the video model is configured
            as V2 runs it, at :data:`~medsam3.model.configs.V2_IMAGE_SIZE` px with hot-start off and V2's
            thresholds (:func:`~medsam3.model.configs.apply_v2_settings`).
        image_size: the input size to configure (video models; with ``recipe="v2"`` it replaces 504), with
            every size that depends on it (:func:`~medsam3.model.configs.set_video_input_size`).

    Writes ``config.json``, ``model.safetensors``, tokenizer and processor files, all into a temporary
    folder that is renamed to ``out_dir`` at the end: nothing is written when anything fails.

    Raises:
        ModelError: unreadable or refused checkpoint, unknown layout; :class:`ConversionError` (a
            ModelError carrying the report) when keys are unexpected, missing or mis-shaped.
        OutputError: ``out_dir`` exists and is not empty, or is the checkpoint itself.
    """
    ckpt = Path(ckpt_path)
    target = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    if target.resolve() == ckpt.resolve() or target.resolve() in ckpt.resolve().parents:
        raise OutputError(f"{out_dir}: the output folder would contain or replace the input {ckpt}")
    if isinstance(config, (str, os.PathLike)):
        config = _load_config_file(config)
    if recipe not in (None, "v2"):
        raise ModelError(f"unknown conversion recipe {recipe!r} (known: v2)")
    if recipe == "v2" and with_tracker is False:
        raise ModelError("a V2 checkpoint is a video model; it cannot be converted as an image model only")
    state, ignored = load_meta_checkpoint(ckpt)
    if recipe == "v2":
        with_tracker = True
    tensors, report, config = _convert(state, config, with_tracker, str(ckpt))
    if recipe is not None or image_size is not None:
        tensors = _configure_size(tensors, config, report, recipe, image_size, str(ckpt))
    report.ignored_entries = ignored
    report.dtype = str(torch_dtype).removeprefix("torch.")
    if not report.ok:
        raise ConversionError(f"{ckpt}: the checkpoint does not convert cleanly:\n{report.summary()}", report)
    tensors = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    config.architectures = [report.model_class]
    config.dtype = torch_dtype
    with atomic_directory(target, overwrite=overwrite) as tmp:
        write_safetensors(tensors, tmp / "model.safetensors")
        config.save_pretrained(str(tmp))
        build_processor(config, video=report.model_class == "Sam3VideoModel").save_pretrained(str(tmp))
    report.output = str(target)
    return report
