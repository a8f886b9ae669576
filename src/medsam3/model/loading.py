"""Load and save SAM3 models (transformers layout) for inference.

* :func:`load_pretrained` resolves a model (see :mod:`medsam3.model.resolve`) and loads one of three kinds:
  ``"image"`` -> ``Sam3Model`` + ``Sam3Processor`` (concept prompts: text, boxes); ``"tracker"`` ->
  ``Sam3TrackerModel`` + ``Sam3TrackerProcessor`` (point / box prompts, SAM2 style) from a folder that holds
  the tracker weights (a converted ``sam3.pt`` or ``facebook/sam3``); ``"video"`` -> ``Sam3VideoModel`` +
  ``Sam3VideoProcessor`` (text concepts through a frame sequence, see :mod:`medsam3.model.video`);
* :func:`load_sam3`, :func:`load_sam3_tracker` and :func:`medsam3.model.video.load_sam3_video` are the same
  with the kind fixed;
* :func:`save_sam3` writes a model folder atomically (temporary folder, then rename).

Loading is strict: any missing, unexpected or mis-shaped weight raises :class:`ModelError` listing them.
The model is put in eval mode on the chosen device and dtype: ``device="auto"`` picks CUDA, then Apple
MPS, then the CPU; ``dtype="auto"`` picks bfloat16 on CUDA (float16 where bfloat16 is unsupported) and
float32 elsewhere; ``dtype="int8"`` (CPU only) quantizes the vision encoder's linear layers after loading
(:mod:`medsam3.model.quantize`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

import torch

from medsam3.errors import ModelError, OutputError
from medsam3.io.atomic import check_not_input, is_write_failure, temporary_name_parts, write_error
from medsam3.model.quantize import check_int8_device, is_int8_name, quantize_int8
from medsam3.model.resolve import ResolvedModel, model_directory, resolve_model

if TYPE_CHECKING:
    from transformers import (
        PreTrainedConfig,
        PreTrainedModel,
        ProcessorMixin,
        Sam3Model,
        Sam3Processor,
        Sam3TrackerConfig,
        Sam3TrackerModel,
        Sam3TrackerProcessor,
        Sam3VideoModel,
        Sam3VideoProcessor,
    )

log = logging.getLogger(__name__)

DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
IMAGE_MODEL_TYPES = ("sam3", "sam3_video")
TRACKER_MODEL_TYPES = ("sam3_video", "sam3_tracker", "sam3_tracker_video")
#: ``model_type`` of a video model folder's ``config.json``.
VIDEO_MODEL_TYPE = "sam3_video"

#: What :func:`load_pretrained` loads: the image model, the point / box tracker or the video model.
ModelKind = Literal["image", "tracker", "video"]
#: The ``model_type`` values (``config.json``) of the folders each kind loads from.
MODEL_TYPES: dict[ModelKind, tuple[str, ...]] = {
    "image": IMAGE_MODEL_TYPES,
    "tracker": TRACKER_MODEL_TYPES,
    "video": (VIDEO_MODEL_TYPE,),
}

ModelT = TypeVar("ModelT", bound="PreTrainedModel")
ProcessorT = TypeVar("ProcessorT", bound="ProcessorMixin")


@dataclass
class LoadedSam3:
    """A ready image model: ``model`` (eval mode, on ``device`` in ``dtype``) and its ``processor``.

    ``source`` is the local folder the weights came from; ``resolved`` says how it was chosen.
    """

    model: Sam3Model
    processor: Sam3Processor
    device: torch.device
    dtype: torch.dtype
    source: str
    resolved: ResolvedModel | None = None


@dataclass
class LoadedSam3Tracker:
    """A ready point/box-prompt model: ``Sam3TrackerModel`` and ``Sam3TrackerProcessor``."""

    model: Sam3TrackerModel
    processor: Sam3TrackerProcessor
    device: torch.device
    dtype: torch.dtype
    source: str
    resolved: ResolvedModel | None = None


@dataclass
class LoadedSam3Video:
    """A ready video model: ``Sam3VideoModel`` (eval mode, on ``device`` in ``dtype``) and its processor."""

    model: Sam3VideoModel
    processor: Sam3VideoProcessor
    device: torch.device
    dtype: torch.dtype
    source: str
    resolved: ResolvedModel | None = None


# --------------------------------------------------------------------------------------------------
# device and dtype


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; an explicit device must be available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"--device {device}: not a device name (auto, cpu, cuda, cuda:N or mps)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: no CUDA GPU is available on this machine (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError(f"--device {device}: Apple MPS is not available on this machine (use cpu or auto)")
    return dev


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or the long names, or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ModelError(f"dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if is_int8_name(name):
        raise ModelError(
            "--dtype int8: unknown as a tensor dtype (int8 quantizes a float32 model's linear layers); give "
            "it to load_pretrained, or use medsam3.model.quantize.quantize_int8"
        )
    if name not in DTYPE_NAMES:
        raise ModelError(f"--dtype {dtype}: unknown; use fp32, bf16, fp16 or int8 (CPU)")
    return DTYPE_NAMES[name]


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bfloat16 on CUDA (float16 on GPUs without bfloat16), float32 on CPU and MPS.

    ``"int8"`` -> float32 (the model is loaded in float32, then its linear layers are quantized: see
    :mod:`medsam3.model.quantize`); refused off the CPU.

    On the CPU float16 is refused (several SAM3 operations have no CPU half kernels, and it is slower than
    float32); bfloat16 runs but with a warning (slower than float32 on most CPUs, coarser masks).
    """
    if is_int8_name(dtype):
        check_int8_device(device)
        return torch.float32
    if str(dtype) == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    chosen = parse_dtype(dtype)
    if device.type == "cpu" and chosen == torch.float16:
        raise ModelError(
            "--dtype fp16 on the CPU: not supported (several SAM3 operations have no CPU "
            "float16 kernels, and it is slower than float32); use --dtype fp32, or a GPU"
        )
    if device.type == "cpu" and chosen == torch.bfloat16:
        log.warning(
            "bfloat16 on the CPU: slower than float32 on most CPUs and less precise; "
            "use --dtype fp32 unless memory is the limit"
        )
    return chosen


# --------------------------------------------------------------------------------------------------
# folders


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path`` in one rename.

    On error the temporary folder is removed and ``path`` is untouched. An existing non-empty ``path`` is
    refused unless ``overwrite`` (then it is replaced only after the new folder is complete).
    """
    target = check_not_input(os.fspath(path))
    if target.exists() and not target.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"{path}: folder exists and is not empty; choose a new folder (or overwrite)")
    prefix, _ = temporary_name_parts(target.name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".part", dir=target.parent))
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        yield tmp
        _default_permissions(tmp)
        if target.is_dir() and any(target.iterdir()):
            old = target.with_name(f"{prefix}old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise write_error(path, exc) from None
        raise


def _default_permissions(folder: Path) -> None:
    """Folders and files as a plain ``mkdir`` / ``open`` would create them (temporary ones are private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for item in folder.rglob("*"):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def read_model_config(folder: Path) -> dict[str, Any]:
    """The raw ``config.json`` of a model folder."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / 'config.json'}: cannot read the model configuration ({exc})") from exc


def _raise_on_loading_problems(info: Mapping[str, Collection[object]], folder: Path, what: str) -> None:
    """Raise :class:`ModelError` if a loading report (``output_loading_info``) lists any problem."""
    problems = []
    for name, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "mis-shaped"),
    ):
        keys = sorted(str(k) for k in info.get(name) or ())
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label} weight(s): {shown}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"]))
    if problems:
        raise ModelError(f"{folder}: the weights do not match {what}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------
# processors


@overload
def build_processor(config: PreTrainedConfig, *, video: Literal[False] = False) -> Sam3Processor: ...


@overload
def build_processor(config: PreTrainedConfig, *, video: Literal[True]) -> Sam3VideoProcessor: ...


@overload
def build_processor(config: PreTrainedConfig, *, video: bool) -> Sam3Processor | Sam3VideoProcessor: ...


def build_processor(config: PreTrainedConfig, *, video: bool = False) -> Sam3Processor | Sam3VideoProcessor:
    """A processor for ``config`` (Sam3Config, Sam3VideoConfig or Sam3TrackerConfig), with the offline CLIP
    tokenizer.

    Images are resized to the model's square input size, rescaled to [0, 1] and normalised with mean = std
    = 0.5; masks come out at 4 x the ViT grid. ``video=True`` returns a ``Sam3VideoProcessor`` (which
    ``Sam3Processor`` and ``Sam3TrackerProcessor`` can also load), else a ``Sam3Processor``.
    """
    from transformers import Sam3ImageProcessor, Sam3Processor, Sam3VideoProcessor

    from medsam3.model.tokenizer import build_clip_tokenizer

    detector = getattr(config, "detector_config", None) or config
    backbone = detector.vision_config.backbone_config
    size, grid = int(backbone.image_size), int(backbone.image_size) // int(backbone.patch_size)
    image_processor = Sam3ImageProcessor(
        size={"height": size, "width": size}, mask_size={"height": 4 * grid, "width": 4 * grid}
    )
    tokenizer = build_clip_tokenizer()
    if not video:
        return Sam3Processor(image_processor=image_processor, tokenizer=tokenizer)
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    video_processor = Sam2VideoVideoProcessor(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size={"height": size, "width": size}
    )
    return Sam3VideoProcessor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer
    )


def _load_processor(cls: type[ProcessorT], folder: Path, config: PreTrainedConfig) -> ProcessorT:
    """``cls.from_pretrained(folder)``; a folder without processor files gets one built from its config."""
    has_processor = any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json"))
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    needs_tokenizer = cls.__name__ != "Sam3TrackerProcessor"
    if has_processor and (has_tokenizer or not needs_tokenizer):
        try:
            return cls.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"{folder}: cannot load the processor / tokenizer files ({exc})") from exc
    log.warning(
        "%s: no processor/tokenizer files; using SAM3's standard preprocessing and the CLIP tokenizer", folder
    )
    built = build_processor(config, video=True)
    if cls.__name__ == "Sam3TrackerProcessor":
        return cls(image_processor=built.image_processor)
    return cls(image_processor=built.image_processor, tokenizer=built.tokenizer)


# --------------------------------------------------------------------------------------------------
# loading: the steps every kind of model shares


def _wrong_model_type(kind: ModelKind, folder: Path, found: object) -> str:
    """Why a folder whose ``config.json`` says ``model_type`` ``found`` cannot give a model of ``kind``."""
    if kind == "image":
        return (
            f"{folder}: model_type {found!r} is not a SAM3 image or video model "
            f"(expected one of {', '.join(IMAGE_MODEL_TYPES)})"
        )
    if kind == "tracker":
        return (
            f"{folder}: holds a {found!r} model without tracker weights; point prompts need the tracker: "
            "convert the full sam3.pt (detector and tracker keys) with `medsam3 convert`, or use "
            "facebook/sam3"
        )
    return (
        f"{folder}: a {found!r} model has no tracker; tracking through a volume needs a SAM3 video model "
        f"(config.json model_type {VIDEO_MODEL_TYPE!r}: facebook/sam3, or a full sam3.pt / Medical SAM3 "
        "checkpoint converted with `medsam3 convert`)"
    )


def _from_pretrained(
    cls: type[ModelT],
    folder: Path,
    what: str,
    dtype: torch.dtype,
    *,
    ignore_mismatched_sizes: bool = False,
    config: PreTrainedConfig | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> ModelT:
    """``cls.from_pretrained`` in ``dtype``, strictly: any weight problem raises :class:`ModelError`.

    The weights come from ``folder``, or, when ``state_dict`` is given, from it and ``config`` (``folder``
    then only names the source in messages). ``what`` names the model in the error of a failed load.
    """
    try:
        loaded = cls.from_pretrained(
            None if state_dict is not None else str(folder),
            config=config,
            state_dict=state_dict,
            dtype=dtype,
            output_loading_info=True,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{folder}: cannot load {what} ({exc})") from exc
    # With output_loading_info=True, from_pretrained returns (model, loading report).
    net, info = cast("tuple[ModelT, dict[str, list[object]]]", loaded)
    _raise_on_loading_problems(info, folder, cls.__name__)
    return net


def _ready(
    net: ModelT, processor_class: type[ProcessorT], folder: Path, device: torch.device
) -> tuple[ModelT, ProcessorT]:
    """``net``'s processor (:func:`_load_processor`), then ``net`` in eval mode on ``device``."""
    processor = _load_processor(processor_class, folder, net.config)
    module: torch.nn.Module = net  # checked as a Module: transformers' ``to`` wrapper has no typed binding
    module.to(device).eval()
    return net, processor


@overload
def load_pretrained(
    source: str | os.PathLike | None,
    kind: Literal["image"],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3: ...


@overload
def load_pretrained(
    source: str | os.PathLike | None,
    kind: Literal["tracker"],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3Tracker: ...


@overload
def load_pretrained(
    source: str | os.PathLike | None,
    kind: Literal["video"],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3Video: ...


@overload
def load_pretrained(
    source: str | os.PathLike | None,
    kind: ModelKind,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3 | LoadedSam3Tracker | LoadedSam3Video: ...


def load_pretrained(
    source: str | os.PathLike | None,
    kind: ModelKind,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3 | LoadedSam3Tracker | LoadedSam3Video:
    """Resolve (see :mod:`medsam3.model.resolve`), load and place a SAM3 model of ``kind`` and its processor.

    Args:
        source: a model folder or Hub id; ``None`` for the configured (or bundled) model.
        kind: ``"image"``: a ``Sam3Model`` (:class:`LoadedSam3`) from a ``sam3`` folder, or the detector of
            a ``sam3_video`` one; ``"tracker"``: a ``Sam3TrackerModel`` (:class:`LoadedSam3Tracker`) from the
            tracker weights of a ``sam3_video``, ``sam3_tracker`` or ``sam3_tracker_video`` folder;
            ``"video"``: a ``Sam3VideoModel`` (:class:`LoadedSam3Video`) from a ``sam3_video`` folder.
        device, dtype: see :func:`pick_device` and :func:`pick_dtype`; ``dtype="int8"`` (CPU only) loads
            the model in float32 and quantizes its vision encoder's linear layers to dynamic int8
            (:func:`medsam3.model.quantize.quantize_int8`); ``dtype`` of the result is then float32.

    A folder without processor files gets SAM3's standard preprocessing and the offline CLIP tokenizer.

    Raises:
        ModelError: no model found, a folder that holds no model of ``kind``, or weights missing /
            unexpected / mis-shaped.
    """
    resolved = resolve_model(source)
    folder = model_directory(resolved)
    dev = pick_device(device)
    int8 = is_int8_name(dtype)
    if int8:
        check_int8_device(dev, device)
    torch_dtype = pick_dtype(dtype, dev)
    raw = read_model_config(folder)
    found = raw.get("model_type")
    if found not in MODEL_TYPES[kind]:
        raise ModelError(_wrong_model_type(kind, folder, found))
    if kind == "image":
        from transformers import Sam3Processor

        image = _ready(_load_image_model(folder, torch_dtype), Sam3Processor, folder, dev)
        return LoadedSam3(_quantized(image[0], int8), image[1], dev, torch_dtype, str(folder), resolved)
    if kind == "tracker":
        from transformers import Sam3TrackerProcessor

        tracker = _ready(_load_tracker_model(folder, raw, torch_dtype), Sam3TrackerProcessor, folder, dev)
        return LoadedSam3Tracker(
            _quantized(tracker[0], int8), tracker[1], dev, torch_dtype, str(folder), resolved
        )
    from transformers import Sam3VideoProcessor

    video = _ready(_load_video_model(folder, torch_dtype), Sam3VideoProcessor, folder, dev)
    return LoadedSam3Video(_quantized(video[0], int8), video[1], dev, torch_dtype, str(folder), resolved)


def _quantized(net: ModelT, int8: bool) -> ModelT:
    """``net`` with its vision encoder's linear layers in dynamic int8 when ``int8``, else unchanged."""
    return cast("ModelT", quantize_int8(net)) if int8 else net


# --------------------------------------------------------------------------------------------------
# loading: what differs between the kinds


def _load_image_model(folder: Path, dtype: torch.dtype) -> Sam3Model:
    """``Sam3Model`` of a ``sam3`` folder, or the detector part of a ``sam3_video`` folder."""
    from transformers import Sam3Model

    return _from_pretrained(Sam3Model, folder, "the SAM3 model", dtype, ignore_mismatched_sizes=True)


def _load_video_model(folder: Path, dtype: torch.dtype) -> Sam3VideoModel:
    """``Sam3VideoModel`` of a ``sam3_video`` folder."""
    from transformers import Sam3VideoModel

    return _from_pretrained(Sam3VideoModel, folder, "the SAM3 video model", dtype)


def _load_tracker_model(folder: Path, raw: dict[str, Any], dtype: torch.dtype) -> Sam3TrackerModel:
    """``Sam3TrackerModel`` from the tracker weights of a video or tracker folder (``raw``: its config.json).

    The weights are picked out of the folder's state dict (:func:`_tracker_state_dict`); every weight the
    tracker needs must be there, in the right shape.
    """
    from transformers import Sam3TrackerModel

    config = _tracker_config(raw)
    with torch.device("meta"):
        wanted = {k: v.shape for k, v in Sam3TrackerModel(config).state_dict().items()}
    state = _tracker_state_dict(folder, wanted)
    missing = sorted(set(wanted) - set(state))
    mis_shaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(wanted[k])}" for k in state if state[k].shape != wanted[k]
    )
    _raise_on_loading_problems(
        {"missing_keys": missing, "mismatched_keys": mis_shaped}, folder, "Sam3TrackerModel"
    )
    return _from_pretrained(
        Sam3TrackerModel, folder, "the SAM3 tracker", dtype, config=config, state_dict=state
    )


def _tracker_config(raw: dict[str, Any]) -> Sam3TrackerConfig:
    """The ``Sam3TrackerConfig`` of a folder's ``config.json`` (a video model's ``tracker_config``), with the
    FPN levels of :func:`tracker_vision_levels`."""
    from transformers import Sam3TrackerConfig

    sub: Any = raw.get("tracker_config") if raw.get("model_type") == "sam3_video" else raw  # a JSON object
    parts = {k: sub[k] for k in ("vision_config", "prompt_encoder_config", "mask_decoder_config") if k in sub}
    if isinstance(parts.get("vision_config"), dict):
        parts["vision_config"] = tracker_vision_levels(parts["vision_config"])
    return Sam3TrackerConfig(**parts)


def _tracker_state_dict(folder: Path, wanted: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Tracker weights from a video-model folder, renamed to ``Sam3TrackerModel`` keys.

    ``detector_model.vision_encoder.backbone.*`` (the shared ViT) -> ``vision_encoder.backbone.*``,
    ``tracker_neck.*`` -> ``vision_encoder.neck.*``, ``tracker_model.*`` -> ``*``; video-only weights (memory
    attention and encoder, object pointers) and the rest of the detector are not needed.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith("detector_model.vision_encoder.backbone."):
                    name = key[len("detector_model.") :]
                elif key.startswith("tracker_neck."):
                    name = "vision_encoder.neck." + key[len("tracker_neck.") :]
                elif key.startswith("tracker_model."):
                    name = key
                    while name.startswith("tracker_model."):  # transformers' own save doubles it
                        name = name[len("tracker_model.") :]
                else:
                    name = key
                if name in wanted:
                    state[name] = f.get_tensor(key)
    return state


def tracker_vision_levels(vision: dict[str, Any]) -> dict[str, Any]:
    """The tracker's vision configuration with only the FPN levels Meta's tracker reads.

    A ``Sam3VideoConfig`` gives its tracker the detector's four FPN scale factors ``[4, 2, 1, 0.5]`` and
    three ``backbone_feature_sizes`` (288, 144 and 72 px at 1008 px). Meta's interactive tracker drops the
    0.5x level and adds its no-memory embedding to the 72 x 72 map; ``Sam3TrackerModel`` adds it to its
    *last* level, so with four levels it lands on the 36 x 36 map that is then discarded, and the 72 x 72
    features go to the mask decoder without it (mask logits ~1e-2 relative off Meta's; see
    ``tests/slow/test_meta_tracker_equivalence.py``). Keeping the first ``len(backbone_feature_sizes)``
    scale factors makes the last level the 72 x 72 one. (``Sam3TrackerVideoModel``, the video path, drops
    the extra level itself and is not loaded through here.)
    """
    sizes = vision.get("backbone_feature_sizes") or []
    scales = list(vision.get("scale_factors") or [])
    if sizes and len(scales) > len(sizes):
        return {**vision, "scale_factors": scales[: len(sizes)]}
    return vision


# --------------------------------------------------------------------------------------------------
# the kinds by name


def load_sam3(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3:
    """Resolve (see :mod:`medsam3.model.resolve`), load and place a ``Sam3Model`` and its processor.

    Works on folders of ``Sam3Model`` (``model_type`` ``sam3``) and of ``Sam3VideoModel`` (``sam3_video``,
    e.g. ``facebook/sam3`` or a converted ``sam3.pt``); for the latter the detector part is loaded.
    Same as :func:`load_pretrained` with ``kind="image"``.

    Raises:
        ModelError: no model found, not a SAM3 folder, or weights missing / unexpected / mis-shaped.
    """
    return load_pretrained(model, "image", device=device, dtype=dtype)


def load_sam3_tracker(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
) -> LoadedSam3Tracker:
    """Load ``Sam3TrackerModel`` (SAM2-style point / box prompts) and ``Sam3TrackerProcessor``.

    The folder must hold the tracker weights: a ``Sam3VideoModel`` folder (``facebook/sam3``, a converted
    ``sam3.pt`` / Medical SAM3 checkpoint with its ``tracker.*`` keys) or a ``Sam3TrackerModel`` folder.
    Same as :func:`load_pretrained` with ``kind="tracker"``.

    Raises:
        ModelError: the folder holds only the image model, or tracker weights are missing / mis-shaped.
    """
    return load_pretrained(model, "tracker", device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# saving


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a state dict as safetensors; tensors sharing storage are copied (safetensors refuses them)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        t = tensor.detach()
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[key] = t
    save_file(out, str(path), metadata={"format": "pt"})


def save_sam3(
    model: Any, processor: ProcessorMixin, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``model`` (Sam3Model or Sam3VideoModel) and ``processor`` to ``out_dir`` atomically.

    The folder gets ``config.json``, ``model.safetensors``, the tokenizer files and the processor
    configuration; it loads back with ``from_pretrained``. Returns the folder path.

    A ``Sam3VideoModel`` is written with its own state-dict keys (``detector_model.*``, ``tracker_model.*``,
    ``tracker_neck.*``, the layout of ``facebook/sam3``), which ``Sam3Model``, ``Sam3TrackerModel``,
    ``Sam3TrackerVideoModel`` and ``Sam3VideoModel`` all load; transformers' own ``save_pretrained``
    would prefix the tracker keys twice.

    ``tokenizer.json`` is written without indentation (:func:`compact_tokenizer_json`): the same tokenizer
    in about half the bytes (3.6 -> 1.7 MB for SAM3's CLIP tokenizer).
    """
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if type(model).__name__ == "Sam3VideoModel":
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(str(tmp))
            write_safetensors(model.state_dict(), tmp / "model.safetensors")
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        compact_tokenizer_json(tmp / "tokenizer.json")
    return Path(out_dir)


def compact_tokenizer_json(path: Path) -> None:
    """Rewrite the ``tokenizer.json`` at ``path`` (if there is one) as JSON without indentation.

    transformers writes it indented, which doubles its size; the parsed content is unchanged, so the
    tokenizer is the same. Non-ASCII characters (the byte-level vocabulary) stay UTF-8, not escaped.
    """
    if not path.is_file():
        return
    content = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(content, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
