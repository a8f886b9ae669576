"""Meta's SAM3 image model (PyPI package ``sam3``) as a CPU reference for the conversion tests.

Test-only helpers: build the full-size model with seeded random weights on a CPU, save it as a
trainer checkpoint in Meta's key layout, and run Meta's own forward pass (text-only and text + box).

Meta's builder and forward hard-code ``device="cuda"`` in a few places (position-encoding and
box-bias caches, ``pin_memory`` of a box scale). :class:`CudaToCpu` redirects those calls to the CPU
from the outside; nothing inside the package is patched.

Frames and shapes: images are ``(1, 3, 1008, 1008)`` float32 normalised with mean = std = 0.5; boxes
are normalised to [0, 1] of the 1008 x 1008 input, ``(cx, cy, w, h)`` for prompts, ``(x0, y0, x1, y1)``
for predictions.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

IMAGE_SIZE = 1008
TEXT_LENGTH = 32


def meta_sam3_available() -> bool:
    """Whether Meta's ``sam3`` package can be imported."""
    return importlib.util.find_spec("sam3") is not None


def _to_cpu_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class CudaToCpu(TorchFunctionMode):
    """Run code that names the ``cuda`` device on the CPU.

    ``device="cuda"`` keyword arguments and positional devices of ``Tensor.to`` become ``cpu``;
    ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to:
            args = tuple(_to_cpu_device(a) for a in args)
        return func(*args, **kwargs)


def clip_bpe_path() -> str:
    """The CLIP BPE vocabulary file (the same file SAM3 ships), taken from ``open_clip``."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError("open_clip_torch is needed for the CLIP BPE vocabulary")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"{path}: CLIP BPE vocabulary not found")
    return str(path)


@dataclass
class FillReport:
    """What :func:`randomize_parameters_` changed: parameter names by the kind of fill."""

    non_finite: list[str]
    constant: list[str]
    duplicate: list[str]
    total: int


def randomize_parameters_(model: torch.nn.Module, seed: int = 0) -> FillReport:
    """Give every parameter distinct, finite values of sensible scale, deterministically.

    Meta's random build leaves some parameters uninitialised (NaN: the text positional embedding and
    text projection) and many constant (LayerNorm weights 1 and biases 0, zero-initialised biases,
    layer scales). A swapped or dropped key is invisible in the outputs when the two tensors hold the
    same constant, so those are replaced:

    * non-finite tensors: ``N(0, s^2)`` with ``s = 0.02`` (``1/sqrt(rows)`` for 2-D matrices);
    * constant tensors (value ``c``): ``c + N(0, s^2)`` with ``s = max(0.1 |c|, 0.02)``;
    * exact copies of an earlier parameter (Meta clones repeated layers, so e.g. the three geometry
      encoder layers start identical): ``+ N(0, (std / 2)^2)``;
    * all other parameters keep the (seeded) random initialisation of the builder.

    Buffers (RoPE tables, relative coordinates) are functions of the architecture and are left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    non_finite, constant, duplicate = [], [], []
    seen: set[tuple] = set()
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])

    def noise(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    with torch.no_grad():
        for name, p in params:
            data = p.data
            if not torch.isfinite(data).all():
                scale = 1.0 / data.shape[0] ** 0.5 if data.ndim == 2 else 0.02
                data.copy_(noise(data.shape) * scale)
                non_finite.append(name)
            elif data.numel() == 1 or bool(data.max() == data.min()):
                c = float(data.flatten()[0])
                data.copy_(c + noise(data.shape) * max(0.1 * abs(c), 0.02))
                constant.append(name)
            elif _fingerprint(data) in seen:
                data.add_(noise(data.shape) * (0.5 * float(data.std())))
                duplicate.append(name)
            seen.add(_fingerprint(data))
    return FillReport(non_finite=non_finite, constant=constant, duplicate=duplicate, total=len(params))


def _fingerprint(t: torch.Tensor) -> tuple:
    flat = t.detach().flatten().double()
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
    return (tuple(t.shape), float((flat * weights).sum()), float(flat.abs().sum()))


def distinct_parameter_check(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Pairs of parameters that are still identical or constant (empty after the fill)."""
    first: dict[tuple, str] = {}
    clashes = []
    for name, p in model.named_parameters():
        if p.numel() > 1 and bool(p.max() == p.min()):
            clashes.append((name, name))
        key = _fingerprint(p)
        if key in first:
            clashes.append((first[key], name))
        first.setdefault(key, name)
    return clashes


def build_meta_image_model(seed: int = 0, *, interactive: bool = False) -> torch.nn.Module:
    """Meta's full-size SAM3 image model, random weights, CPU, float32, eval mode; with ``interactive``
    also its interactive tracker (``enable_inst_interactivity``, see ``meta_tracker_reference``).

    ``torch.manual_seed(seed)`` precedes the build so the default initialisation is reproducible;
    :func:`randomize_parameters_` then fills the NaN and constant tensors.
    """
    from sam3.model_builder import build_sam3_image_model

    torch.manual_seed(seed)
    with CudaToCpu():
        model = build_sam3_image_model(
            bpe_path=clip_bpe_path(),
            device="cpu",
            eval_mode=True,
            checkpoint_path=None,
            load_from_HF=False,
            enable_segmentation=True,
            enable_inst_interactivity=interactive,
        )
    model = model.float().eval()
    model.fill_report = randomize_parameters_(model, seed=seed + 1)
    return model


def save_trainer_checkpoint(model: torch.nn.Module, path: Path) -> int:
    """Save ``model`` the way SAM3 / Medical SAM3 checkpoints store it; returns the number of keys.

    Layout: ``{"model": {"detector.<key>": tensor, ...}, "optimizer": {...}, "epoch": ..., ...}``: the
    image model's keys carry the ``detector.`` prefix (Meta's loader strips it), beside optimizer state
    and trainer counters that a converter must ignore.
    """
    state = {f"detector.{k}": v for k, v in model.state_dict().items()}
    first = next(iter(model.parameters()))
    checkpoint = {
        "model": state,
        "optimizer": {
            "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(first)}},
            "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "params": [0]}],
        },
        "epoch": 3,
        "steps": {"train": 1000, "val": 0},
        "best_meter_values": {},
    }
    torch.save(checkpoint, path)
    return len(state)


def make_test_image(size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """A deterministic ``(size, size, 3)`` uint8 RGB image: smooth gradients, a bright disc, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((xx - 0.4) ** 2 + (yy - 0.55) ** 2 < 0.04).astype(np.float32)
    channels = [
        0.5 + 0.3 * np.sin(6 * xx + 2 * yy) + 0.3 * disc,
        0.4 + 0.4 * yy - 0.2 * disc,
        0.3 + 0.3 * np.cos(4 * yy) * xx + 0.4 * disc,
    ]
    img = np.stack(channels, axis=-1) + rng.normal(0, 0.05, (size, size, 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def meta_pixel_values(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """Meta's own preprocessing (``Sam3Processor.transform``): ``(1, 3, 1008, 1008)`` float32."""
    from sam3.model.sam3_image_processor import Sam3Processor
    from torchvision.transforms import v2

    processor = Sam3Processor(model, resolution=IMAGE_SIZE, device="cpu")
    tensor = v2.functional.to_image(image)
    return processor.transform(tensor).unsqueeze(0).float()


def meta_token_ids(model: torch.nn.Module, text: str) -> torch.Tensor:
    """Meta's token ids for ``text``: ``(1, 32)`` int64, zero-padded after the end token."""
    tokenizer = model.backbone.language_backbone.tokenizer
    return tokenizer([text], context_length=TEXT_LENGTH)


@torch.inference_mode()
def meta_vision(model: torch.nn.Module, pixel_values: torch.Tensor) -> dict:
    """Meta's vision backbone output (``backbone_fpn``: 3 maps ``(1, 256, s, s)``, s = 288, 144, 72)."""
    with CudaToCpu():
        return model.backbone.forward_image(pixel_values)


@torch.inference_mode()
def meta_predict(
    model: torch.nn.Module,
    vision: dict,
    text: str,
    box_cxcywh: tuple[float, float, float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Meta's grounding forward for one text prompt and optionally one positive box.

    Returns float32 tensors: ``pred_logits (1, 200)``, ``pred_boxes (1, 200, 4)`` xyxy normalised,
    ``pred_masks (1, 200, 288, 288)`` logits, ``presence_logits (1, 1)``, ``semantic_seg (1, 1, 288,
    288)``, and intermediates ``text_features (1, 32, 256)``, ``text_mask (1, 32)`` (True = valid),
    ``prompt (1, P, 256)`` (text then geometry tokens), ``prompt_mask (1, P)`` (True = valid),
    ``encoder_hidden_states (1, 5184, 256)``, ``fpn_0..2``.
    """
    from sam3.model.data_misc import FindStage

    with CudaToCpu():
        text_out = model.backbone.forward_text([text], device=torch.device("cpu"))
        backbone_out = {**vision, **text_out}
        prompt = model._get_dummy_prompt()
        if box_cxcywh is not None:
            boxes = torch.tensor(box_cxcywh, dtype=torch.float32).view(1, 1, 4)
            labels = torch.ones(1, 1, dtype=torch.bool)
            prompt.append_boxes(boxes, labels)
        find = FindStage(
            img_ids=torch.tensor([0], dtype=torch.long),
            text_ids=torch.tensor([0], dtype=torch.long),
            input_boxes=None,
            input_boxes_mask=None,
            input_boxes_label=None,
            input_points=None,
            input_points_mask=None,
        )
        out = model.forward_grounding(
            backbone_out=backbone_out, find_input=find, geometric_prompt=prompt, find_target=None
        )
    enc = out["prev_encoder_out"]["encoder_out"]
    result = {
        "pred_logits": out["pred_logits"].squeeze(-1),
        "pred_boxes": out["pred_boxes_xyxy"],
        "pred_masks": out["pred_masks"],
        "presence_logits": out["presence_logit_dec"].reshape(1, 1),
        "semantic_seg": out["semantic_seg"],
        "text_features": text_out["language_features"].transpose(0, 1),
        # Meta's masks are key-padding masks (True = ignore); flipped here to True = valid.
        "text_mask": ~text_out["language_mask"],
        "prompt": enc["prompt_before_enc"].transpose(0, 1),
        "prompt_mask": ~enc["prompt_mask"],
        "encoder_hidden_states": enc["encoder_hidden_states"].transpose(0, 1),
    }
    for i, feat in enumerate(vision["backbone_fpn"]):
        result[f"fpn_{i}"] = feat
    return {
        k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
        for k, v in result.items()
    }


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |ours - reference| / max |reference|`` (0 when both are all zero)."""
    ours, reference = ours.double(), reference.double()
    denom = reference.abs().max().item()
    diff = (ours - reference).abs().max().item()
    return diff / denom if denom > 0 else diff


def mean_abs_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """``mean |ours - reference|``."""
    return (ours.double() - reference.double()).abs().mean().item()


# --------------------------------------------------------------------------------------------------
# what a results file records about the run


def machine_description() -> str:
    """CPU model, logical CPUs, torch threads, RAM and GPU (or "no GPU used"), one line."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 1024**2:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU used"
    return f"{cpu}, {os.cpu_count()} logical CPUs (torch threads {torch.get_num_threads()}){mem}, {gpu}"


def package_versions(*names: str) -> str:
    """``"name version, ..."`` of the installed distributions ``names`` ("(not installed)" when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)
