"""The GPU benchmark: the full-size SAM3 architecture with random weights, one GPU, one results file.

``benchmarks/gpu.sh`` runs this driver. It builds ``Sam3Model(full_sam3_config())`` (and for track mode
``Sam3VideoModel(sam3_video_config(full_sam3_config()))``) with random weights on the GPU, no download,
and times, in named sections (:data:`SECTIONS`, run in order; ``--sections`` picks some):

``encoder``
    the vision encoder at 1008 px in bf16, ms per slice at batch 1 and batch 8;
``prompts``
    the detector on cached image features, ms for 1 and 8 prompts on one slice (ms per extra prompt);
``volume``
    ``Segmenter.segment`` on a synthetic 300-slice CT (512 x 512, 1.5 mm slices) in slices mode with 1 and
    5 prompts, ``search="full"`` and ``search="coarse"``; with random weights the presence head decides
    nothing meaningful, so presence is driven by organ-like z-extents (the prompts' structures span
    10-30% of the slices, as in ``slice_search.md``), and the model still runs every encoder and detector
    pass the search asks for;
``track``
    ``mode="track"`` on the first 100 slices with one prompt (one object tracked through every slice: the
    video model's thresholds opened and its object-score head biased, as in ``bench_track.py``);
``train``
    one training step (forward, SAM3 loss, backward, AdamW) at batch ``--train-batch``, full fine-tuning and
    LoRA (rank 16), both with activation checkpointing and bf16 autocast: images/s and peak memory;
``clip_train``
    one training step of the video model on an 8-frame clip at 1008 px in bf16 (detector on every frame,
    tracker through its memory bank), with and without activation checkpointing, beside a 2D step on the
    same frames (``benchmarks/bench_clip_train.py``).

A section is a function registered with :func:`section`; a new one (e.g. a video-model clip training
step) is one more function. Each reports its Markdown lines, its wall time and its peak GPU memory.

Without CUDA the script stops at once with exit status 2 and says so. ``--dry-run`` (the same as
``--device cpu --tiny`` with short runs) runs every section on the tiny random model on the CPU in seconds:
it checks the script, not the GPU. The results file is ``benchmarks/results/gpu_<GPU name>.md`` (``--out``
to change it; a dry run writes only with ``--out``).

    benchmarks/gpu.sh                      # on a machine with one GPU; < 8 minutes on an H100
    benchmarks/gpu.sh --dry-run            # anywhere, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: Exit status when the GPU this benchmark needs is missing.
NO_GPU = 2
#: Prompts of the volume sections, and the fraction of the slices each structure spans (its z-extent).
ORGANS = (("liver", 0.30), ("spleen", 0.15), ("left kidney", 0.12), ("pancreas", 0.10), ("aorta", 0.25))


class NoGpuError(RuntimeError):
    """The benchmark asked for CUDA on a machine without it."""


@dataclass
class Bench:
    """What every section shares: the device, the sizes, the models (built once, on first use)."""

    device: torch.device
    dtype: torch.dtype
    tiny: bool
    slices: int
    track_slices: int
    repeats: int
    train_batch: int
    _models: dict[str, Any] = field(default_factory=dict)

    # -- timing and memory ----------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any], repeats: int | None = None, warmup: int = 1) -> list[float]:
        """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` calls (the device synchronised)."""
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(repeats or self.repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - start)
        return out

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        """Peak GPU memory allocated by tensors since :meth:`reset_peak`, GiB (``None`` on the CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    # -- models -----------------------------------------------------------------------------------------
    def config(self) -> Any:
        from medsam3.model.configs import full_sam3_config, tiny_sam3_config

        return tiny_sam3_config() if self.tiny else full_sam3_config()

    def build(self, cls: Any, config: Any, dtype: torch.dtype) -> Any:
        """``cls(config)`` with random weights (seed 0) made directly on the device, in ``dtype``."""
        torch.manual_seed(0)
        with torch.device(self.device):
            model = cls(config)
        return model.to(dtype=dtype).eval()

    def image_model(self) -> Any:
        """The random SAM3 image model in the benchmark's dtype, and its processor (``.model``,
        ``.processor``, ``.source``)."""
        if "image" not in self._models:
            from transformers import Sam3Model

            from medsam3.model.loading import build_processor

            config = self.config()
            model = self.build(Sam3Model, config, self.dtype)
            name = "tiny random SAM3" if self.tiny else "full-size random SAM3"
            processor = build_processor(config)
            self._models["image"] = SimpleNamespace(model=model, processor=processor, source=name)
        return self._models["image"]

    def video_model(self) -> Any:
        """The random SAM3 video model (one detector query, tracking opened; module docstring)."""
        if "video" not in self._models:
            from transformers import Sam3VideoModel

            from medsam3.model.configs import OPEN_VIDEO_THRESHOLDS, sam3_video_config

            config = sam3_video_config(self.config(), **OPEN_VIDEO_THRESHOLDS)
            config.detector_config.detr_decoder_config.num_queries = 1
            model = self.build(Sam3VideoModel, config, self.dtype)
            with torch.no_grad():
                model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
            self._models["video"] = model
        return self._models["video"]

    def drop_models(self) -> None:
        self._models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def size(self) -> int:
        return int(self.image_model().model.config.vision_config.backbone_config.image_size)


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Bench], list[str]]
    what: str


#: The sections, in the order they run.
SECTIONS: dict[str, Section] = {}


def section(name: str, what: str) -> Callable[[Callable[[Bench], list[str]]], Callable[[Bench], list[str]]]:
    """Register a section ``name`` (one line ``what`` for ``--help`` and the results file)."""

    def register(fn: Callable[[Bench], list[str]]) -> Callable[[Bench], list[str]]:
        SECTIONS[name] = Section(name, fn, what)
        return fn

    return register


def _ms(values: list[float], per: int = 1) -> str:
    return f"{1000 * statistics.median(values) / per:.1f}"


# --------------------------------------------------------------------------------------------------
# sections


@section("encoder", "vision encoder, ms per slice at batch 1 and 8")
def encoder(b: Bench) -> list[str]:
    model, size = b.image_model().model, b.size()
    lines = ["| batch | ms per call | ms per slice | slices/s |", "|---:|---:|---:|---:|"]
    for batch in (1, 8):
        x = torch.randn(batch, 3, size, size, device=b.device, dtype=b.dtype)
        with torch.inference_mode():
            times = b.timed(lambda x=x: model.get_vision_features(pixel_values=x))
        per = statistics.median(times) / batch
        lines.append(f"| {batch} | {_ms(times)} | {1000 * per:.1f} | {1 / per:.1f} |")
    precision = str(b.dtype).removeprefix("torch.")
    return [f"{size} px, {precision}, median of {b.repeats} calls after one warm-up.", "", *lines]


@section("prompts", "detector on cached features: ms for 1 and 8 prompts on one slice, ms per extra prompt")
def prompts(b: Bench) -> list[str]:
    from medsam3.predict.engine import Engine

    engine = Engine(b.image_model())
    size = b.size()
    x = torch.randn(1, 3, size, size, device=b.device, dtype=b.dtype)
    texts = [name for name, _ in ORGANS] + ["kidney", "bladder", "stomach"]
    lines = ["| prompts | ms per slice (detector, text encoder included) |", "|---:|---:|"]
    medians = {}
    with torch.inference_mode():
        vision = engine.encode_images(x)
        for n in (1, 8):
            tokens = engine.tokenize(texts[:n])  # one slice's features, broadcast over the n prompts
            times = b.timed(lambda t=tokens: engine.detect(vision, tokens=t))
            medians[n] = statistics.median(times)
            lines.append(f"| {n} | {_ms(times)} |")
    extra = 1000 * (medians[8] - medians[1]) / 7
    return [*lines, "", f"Per extra prompt: {extra:.1f} ms (the 8-prompt call minus the 1-prompt call, / 7)."]


def synthetic_ct(slices: int, side: int = 512) -> Any:
    """A ``(slices, side, side)`` int16 CT in HU (body ellipse of soft tissue with noise, air around),
    0.8 x 0.8 x 1.5 mm."""
    from medsam3.image import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    body = ((yy - side / 2) / (0.38 * side)) ** 2 + ((xx - side / 2) / (0.45 * side)) ** 2 <= 1
    base = np.where(body, 40, -1000).astype(np.int16)
    arr = np.empty((slices, side, side), dtype=np.int16)
    for k in range(slices):
        arr[k] = base + rng.normal(0, 20, (side, side)).astype(np.int16)
    return Image.from_array(arr, spacing=(0.8, 0.8, 1.5), modality="CT")


def organ_profiles(n: int, count: int) -> list[np.ndarray]:
    """Per prompt, the slices where its presence passes: one z-extent of :data:`ORGANS`' fraction."""
    out = []
    for i, (_, fraction) in enumerate(ORGANS[:count]):
        length = max(1, int(round(fraction * n)))
        start = int((0.15 + 0.1 * i) * n) % max(1, n - length)
        profile = np.zeros(n, dtype=bool)
        profile[start : start + length] = True
        out.append(profile)
    return out


@section("volume", "synthetic CT in slices mode, 1 and 5 prompts, full pass vs coarse search")
def volume(b: Bench) -> list[str]:
    from bench_slice_search import controlled_presence  # presence driven per slice, as that benchmark does
    from medsam3.predict.prompts import Prompt
    from medsam3.predict.segmenter import Segmenter

    ct = synthetic_ct(b.slices, 64 if b.tiny else 512)
    seg = Segmenter(b.image_model(), window="abdomen", slice_batch=8)  # one intensity group for all prompts
    lines = [
        "| prompts | search | encoder passes | s per volume | ms per slice of the volume |",
        "|---:|---|---:|---:|---:|",
    ]
    for count in (1, 5):
        prompts = [Prompt(name) for name, _ in ORGANS[:count]]
        with controlled_presence(organ_profiles(b.slices, count)):
            seg.segment(ct, prompts[:1], search="coarse")  # warm-up (a short run)
            for search in ("full", "coarse"):
                start = time.perf_counter()
                result = seg.segment(ct, prompts, search=search)
                b.sync()
                times = [time.perf_counter() - start]
                passes = result.settings["image_encoder_runs"]
                lines.append(
                    f"| {count} | {search} | {passes} | {times[0]:.2f} | {1000 * times[0] / b.slices:.1f} |"
                )
    extents = ", ".join(f"{n} {int(round(f * 100))}%" for n, f in ORGANS)
    return [
        f"{b.slices} slices of {ct.spatial_shape[1]} x {ct.spatial_shape[2]} px (0.8 x 0.8 x 1.5 mm), "
        "window abdomen, `slice_batch=8`, everything of `Segmenter.segment` included (intensity, resizing, "
        f"encoder, detector, 3D post-processing). Presence driven by one z-extent per prompt ({extents} of "
        "the slices); coarse: the default 10 mm step (every 6th slice).",
        "",
        *lines,
    ]


@section("track", "track mode on 100 slices, one prompt")
def track(b: Bench) -> list[str]:
    from medsam3.predict.engine import Engine
    from medsam3.predict.segmenter import Segmenter

    ct = synthetic_ct(b.track_slices, 64 if b.tiny else 512)
    engine = Engine(b.image_model(), video=b.video_model())
    seg = Segmenter(engine, mode="track", window="abdomen")
    b.reset_peak()
    times = b.timed(lambda: seg.segment(ct, "liver"), 1, 1)
    peak = b.peak_gib()
    return [
        f"{b.track_slices} slices of {ct.spatial_shape[1]} x {ct.spatial_shape[2]} px, one prompt, one "
        "object tracked through every slice (random weights, tracking thresholds opened), after one warm-up "
        "run.",
        "",
        "| s per volume | ms per slice | peak GPU memory (GiB) |",
        "|---:|---:|---:|",
        f"| {times[0]:.2f} | {1000 * times[0] / b.track_slices:.1f} | {_gib(peak)} |",
    ]


def _gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f}"


def _train_batch(b: Bench, size: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Random images with one text prompt each and one box + mask target per image."""
    engine_tokens = b.image_model().processor.tokenizer(
        ["liver"] * b.train_batch, padding="max_length", max_length=32, return_tensors="pt"
    )
    inputs = {
        "pixel_values": torch.randn(b.train_batch, 3, size, size, device=b.device),
        "input_ids": engine_tokens["input_ids"].to(b.device),
        "attention_mask": engine_tokens["attention_mask"].to(b.device),
    }
    grid = 4 * (size // 14)
    mask = torch.zeros(1, grid, grid, device=b.device)
    mask[:, grid // 4 : grid // 2, grid // 4 : grid // 2] = 1
    box = torch.tensor([[0.375, 0.375, 0.25, 0.25]], device=b.device)
    return inputs, [{"boxes": box, "masks": mask} for _ in range(b.train_batch)]


def _step(
    module: Any,
    optim: torch.optim.Optimizer,
    loss_fn: Any,
    inputs: dict[str, torch.Tensor],
    targets: list[dict[str, torch.Tensor]],
    device_type: str,
    autocast: torch.dtype | None,
) -> Callable[[], None]:
    """One training step: forward (under ``autocast`` when given), loss, backward, optimiser step."""

    def step() -> None:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            outputs = module(**inputs)
        loss_fn(outputs, targets)["loss"].backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


@section("train", "one training step, full and LoRA, activation checkpointing: images/s and peak memory")
def train(b: Bench) -> list[str]:
    from transformers import Sam3Model

    from medsam3.train.config import LoraSection
    from medsam3.train.cpu_autocast import geometry_encoder_in_fp32
    from medsam3.train.lora import apply_lora
    from medsam3.train.losses import LossConfig, Sam3Loss
    from medsam3.train.model import Sam3TrainModule, enable_activation_checkpointing

    b.drop_models()  # the inference models are not needed any more
    config = b.config()
    size = int(config.vision_config.backbone_config.image_size)
    loss_fn = Sam3Loss(LossConfig())
    autocast = b.dtype != torch.float32
    lines = [
        "| variant | trainable parameters | s per step | images/s | peak GPU memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in ("full", "lora"):
        model = b.build(Sam3Model, config, torch.float32).train()  # fp32 weights, bf16 autocast
        geometry_encoder_in_fp32(model)  # as training does: only changes anything under CPU autocast
        if variant == "lora":
            apply_lora(model, LoraSection())
        layers = enable_activation_checkpointing(model)
        module = Sam3TrainModule(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(params, lr=1e-5)
        inputs, targets = _train_batch(b, size)

        step = _step(module, optim, loss_fn, inputs, targets, b.device.type, b.dtype if autocast else None)
        b.reset_peak()
        times = b.timed(step, max(1, min(b.repeats, 3)), 1)
        per = statistics.median(times)
        trainable = sum(p.numel() for p in params)
        lines.append(
            f"| {variant} ({layers} checkpointed layers) | {trainable / 1e6:.1f} M | {per:.3f} | "
            f"{b.train_batch / per:.1f} | {_gib(b.peak_gib())} |"
        )
        del model, module, optim, params
        b.drop_models()
    precision = f"{str(b.dtype).removeprefix('torch.')} autocast" if autocast else "fp32"
    return [
        f"Batch {b.train_batch} at {size} px, one text prompt and one box + mask target per image, SAM3's "
        f"loss (`Sam3Loss`, every term), AdamW; float32 weights, {precision}; LoRA rank 16 on the ViT and "
        "the text encoder; median of the timed steps after one warm-up step.",
        "",
        *lines,
    ]


@section("clip_train", "one video-model clip training step (8 frames), with and without checkpointing")
def clip_train(b: Bench) -> list[str]:
    """``benchmarks/bench_clip_train.py``'s step of clip training (detector on every frame, tracker through
    its memory bank, SAM3 + tracker losses, AdamW) beside a 2D step on the same 8 frames."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_clip_train", Path(__file__).with_name("bench_clip_train.py")
    )
    assert spec is not None and spec.loader is not None
    clip_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clip_bench)
    b.drop_models()
    bf16 = b.dtype != torch.float32
    lines = [
        "| activation checkpointing | 2D step s (8 slices) | clip step s | clip frames/s "
        "| peak GPU memory 2D / clip (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for checkpointing in (True, False):
        try:
            r = clip_bench.clip_step_benchmark(
                size="tiny" if b.tiny else "full",
                frames=8,
                steps=max(1, min(b.repeats, 2)),
                bf16=bf16,
                checkpointing=checkpointing,
                device=str(b.device),
            )
        except torch.cuda.OutOfMemoryError as exc:
            lines.append(f"| {'yes' if checkpointing else 'no'} | out of GPU memory: {str(exc)[:80]} | | | |")
            b.drop_models()
            continue
        flat, clip = r["slices_2d"], r["clip_video"]
        memory = (
            f"{flat['peak_mib'] / 1024:.1f} / {clip['peak_mib'] / 1024:.1f}"
            if b.device.type == "cuda"
            else "-"
        )
        lines.append(
            f"| {'yes' if checkpointing else 'no'} | {flat['seconds_per_step']:.3f} | "
            f"{clip['seconds_per_step']:.3f} | {8 / clip['seconds_per_step']:.1f} | {memory} |"
        )
        b.drop_models()
    precision = "bf16 autocast" if bf16 else "fp32"
    return [
        f"`Sam3VideoModel` ({'tiny' if b.tiny else 'full-size'} architecture, random weights), one clip of 8 "
        f"frames at the model's input size, one text prompt, {precision}, float32 weights; the tracker "
        "starts from the ground truth on frame 0 and tracks frames 1-7 differentiably "
        "(`medsam3.train.video_model.VideoTrainModule`); the 2D step trains the same detector on the 8 "
        "frames as a batch. Checkpointing: the ViT / text layers and each tracked frame.",
        "",
        *lines,
    ]


# --------------------------------------------------------------------------------------------------
# driver


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def results_path(name: str) -> Path:
    """``benchmarks/results/gpu_<name>.md`` with the name made file-safe."""
    return RESULTS / f"gpu_{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_')}.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu.sh",
        description="Time the full-size SAM3 architecture (random weights) on one GPU and write one results "
        "file. Sections: " + "; ".join(f"{s.name}: {s.what}" for s in SECTIONS.values()),
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="default: bf16 on CUDA, fp32 on the CPU",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead of the full size")
    parser.add_argument(
        "--dry-run", action="store_true", help="every section on the tiny model on the CPU, short runs"
    )
    parser.add_argument(
        "--sections",
        type=_sections,
        default=tuple(SECTIONS),
        metavar="A,B",
        help=f"sections to run, in their order (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument("--slices", type=_positive, default=None, help="slices of the volume (default 300)")
    parser.add_argument("--track-slices", type=_positive, default=None, help="slices tracked (default 100)")
    parser.add_argument("--repeats", type=_positive, default=None, help="timed calls per figure (default 10)")
    parser.add_argument("--train-batch", type=_positive, default=None, help="training batch (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: by the GPU's name)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        if args.device not in ("cuda", "cpu"):
            parser.error("--dry-run runs on the CPU; leave out --device")
        args.device, args.tiny = "cpu", True
    small = args.dry_run
    args.slices = args.slices or (8 if small else 300)
    args.track_slices = args.track_slices or (4 if small else 100)
    args.repeats = args.repeats or (1 if small else 10)
    args.train_batch = args.train_batch or (2 if small else 4)
    if torch.device(args.device).type == "cpu" and not args.tiny:
        parser.error("the full-size model on the CPU takes about a minute a slice: add --tiny (or --dry-run)")
    return args


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section {unknown[0] if unknown else text!r}; sections: {', '.join(SECTIONS)}"
        )
    return tuple(n for n in SECTIONS if n in names)


def check_device(name: str) -> torch.device:
    """The device to run on.

    Raises:
        NoGpuError: CUDA asked for and not available (the message says what was found).
    """
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NoGpuError(
                f"no CUDA GPU is available (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). This benchmark needs "
                "one GPU; to check the script on the CPU run: benchmarks/gpu.sh --dry-run"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NoGpuError(f"{name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise NoGpuError(f"{name}: the benchmark runs on cuda or (with --tiny) cpu")
    return device


def _gpu_details(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f" ({memory:.0f} GiB), CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible"


def run(args: argparse.Namespace) -> str:
    """Run the chosen sections; the results as Markdown."""
    device = check_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bench = Bench(device, dtype, args.tiny, args.slices, args.track_slices, args.repeats, args.train_batch)
    name = gpu_name(device)
    started = time.perf_counter()
    lines = [
        f"# GPU benchmark: {'tiny' if args.tiny else 'full-size'} SAM3 architecture, random weights, {name}",
        "",
        f"Command: `{' '.join(['benchmarks/gpu.sh', *args.argv])}`",
        "",
        f"- device: {name}{_gpu_details(device)}; torch {torch.__version__}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}",
        f"- precision {str(dtype).removeprefix('torch.')}; random weights (seed 0), built on the device; no "
        "download; absolute times are the architecture's, not a trained model's (which does the same work "
        "except where its detections differ)",
        "- sections: " + ", ".join(args.sections),
    ]
    for name_ in args.sections:
        sec = SECTIONS[name_]
        print(f"[{name_}] {sec.what} ...", file=sys.stderr, flush=True)
        bench.reset_peak()
        start = time.perf_counter()
        body = sec.run(bench)
        took = time.perf_counter() - start
        peak = bench.peak_gib()
        memory = "" if peak is None else f"; peak GPU memory {peak:.2f} GiB"
        lines += ["", f"## {name_}: {sec.what}", "", *body, "", f"Section time {took:.1f} s{memory}."]
        print(f"[{name_}] {took:.1f} s", file=sys.stderr, flush=True)
    lines += ["", f"Total {time.perf_counter() - started:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text = run(args)
    except NoGpuError as exc:
        print(f"benchmarks/gpu.sh: {exc}", file=sys.stderr)
        return NO_GPU
    out = args.out
    if out is None and not args.dry_run:
        out = results_path(gpu_name(torch.device(args.device)))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"results: {out}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
