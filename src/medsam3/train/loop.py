"""The training loop: SAM3 fine-tuning on a manifest, on Hugging Face ``accelerate`` (CPU, one or many GPUs).

Read top to bottom, :func:`train` does:

1. **Check before step 1.** Read the manifest, check files, grids and label values
   (:func:`~medsam3.train.batches.verify_records`, split over processes), build the model, the parameter
   groups and the data stream. Every user error surfaces here, before anything is trained or written.
2. **Resume** from ``run_dir/checkpoints/last.pt`` (or the given checkpoint): weights, optimizer, scheduler,
   gradient scaler, stream position, random states, step, epoch and best score. A run stopped at step ``k``
   and resumed follows the same losses as a run that never stopped (CPU, same seed).
3. **Steps.** Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` items per process.
   Micro-batch ``m`` of step ``s`` on process ``r`` of ``W`` is the stream's global batch
   ``(s * grad_accum + m) * W + r`` (:class:`medsam3.data.sampler.SliceSampleDataset`), so a global batch
   is the same set of items whatever the split between processes and accumulation. Losses are normalised
   by the global number of target objects of the step, ``N = (sum over all micro-batches and processes) /
   (W * grad_accum)``, and each micro-batch loss is divided by ``grad_accum``; DDP averages over processes.
   The gradient is then the same for ``W`` processes x 1 micro-batch as for 1 process x ``W`` micro-batches.
   Dropout is seeded per global batch, so it does not depend on that split either. Then gradient clipping,
   AdamW, the LR schedule.
4. **Validation** (Dice per dataset, :mod:`medsam3.train.validate`) and **checkpoints**
   (:mod:`medsam3.train.checkpoint`) at the end of every epoch or every ``val_every`` / ``save_every``
   steps, the best by validation Dice kept as ``best.pt``; logs to TensorBoard, ``metrics.jsonl`` and the
   console on the main process only.
5. **Export** the final and/or best model with :func:`~medsam3.model.loading.save_sam3` (LoRA merged) to
   ``run_dir/export/{final,best}``: folders ``medsam3 segment --model`` loads.

Distributed: launch with ``accelerate launch`` or ``torchrun``; DDP by default, FSDP through an
``accelerate`` config. The forward goes through one module (:class:`~medsam3.train.model.Sam3TrainModule`)
so that DDP / FSDP see the whole computation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsam3.errors import InputError
from medsam3.train.checkpoint import (
    LAST,
    checkpoint_dir,
    export_run_models,
    find_resume_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_training_state,
    set_rng_state,
)
from medsam3.train.config import (
    RUN_CONTROL_KEYS,
    TrainConfig,
    config_differences,
    config_from_dict,
    config_to_dict,
    config_yaml,
)
from medsam3.train.model import Sam3TrainModule, build_model, training_input_size

log = logging.getLogger(__name__)

_DROPOUT_STREAM = 104729


def build_loss(cfg: TrainConfig):
    """The loss callable ``(outputs, targets, num_targets) -> terms`` of ``cfg.loss``."""
    from medsam3.train.losses import LossConfig, Sam3Loss, SimpleSegLoss

    if cfg.loss.kind == "simple":
        simple = SimpleSegLoss(**cfg.loss.overrides) if cfg.loss.overrides else SimpleSegLoss()
        return lambda outputs, targets, num_targets: simple(outputs, targets)
    base = {
        "default": LossConfig,
        "sam3": LossConfig.sam3,
        "medical_sam3_public": LossConfig.medical_sam3_public,
    }[cfg.loss.preset]()
    try:
        loss_config = replace(base, aux_loss=cfg.loss.aux_loss, **cfg.loss.overrides)
    except TypeError as exc:
        raise InputError(None, f"config: loss.overrides: {exc}") from None
    sam3_loss = Sam3Loss(loss_config)
    return lambda outputs, targets, num_targets: sam3_loss(outputs, targets, num_targets_global=num_targets)


def build_video_loss(cfg: TrainConfig):
    """The clip loss ``(outputs, frame_targets, track_targets, n_objects, n_tracked) -> terms``:
    ``cfg.loss`` on the detector's per-frame outputs plus the tracker terms of ``cfg.clips``
    (:mod:`medsam3.train.losses_track`) on the tracked frames; ``loss`` is their sum."""
    from medsam3.train.losses_track import TRACK_LOSS_PRESETS, track_losses

    detector_loss = build_loss(cfg)
    try:
        track_config = replace(TRACK_LOSS_PRESETS[cfg.clips.track_loss](), **cfg.clips.track_loss_overrides)
    except TypeError as exc:
        raise InputError(None, f"config: clips.track_loss_overrides: {exc}") from None

    def loss(outputs, targets, track_targets, n_objects: float, n_tracked: float) -> dict[str, Any]:
        terms = dict(detector_loss(outputs["detector"], targets, n_objects))
        total = terms.pop("loss")
        tracker = outputs["tracker"]
        extra = track_losses(
            tracker["pred_masks"],
            tracker["iou"],
            tracker["object_score_logits"],
            track_targets,
            n_tracked,
            track_config,
        )
        terms.update(extra)
        terms["loss"] = total + sum(extra.values())
        return terms

    return loss


def default_steps_per_epoch(records, split: str, global_batch: int) -> int:
    """Training images (2D) plus foreground slices (3D) of ``split``, over the global batch (rounded up)."""
    seen, units = set(), 0
    for r in records:
        if r.split != split:
            continue
        key = (r.dataset, tuple(r.image), r.source.get("image_id"))
        if r.dims == 2:
            units += key not in seen
        else:
            slices = set()
            for concept in r.foreground:
                slices.update(r.foreground_slices(concept).tolist())
            units += len(slices)
        seen.add(key)
    return max(1, math.ceil(units / global_batch))


def seed_micro_batch(seed: int, global_batch: int) -> None:
    """Seed torch's generators for one global batch (dropout does not depend on processes or resumes)."""
    state = np.random.SeedSequence([int(seed), _DROPOUT_STREAM, int(global_batch)]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def _all_reduce_sum(value: float, device) -> float:
    return _all_reduce_sums([value], device)[0]


def _all_reduce_sums(values: list[float], device) -> list[float]:
    """Sums over processes of equally long lists of numbers, in one all-reduce."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _all_reduce_mean(values: dict[str, float], device) -> dict[str, float]:
    """Mean over processes of equally keyed scalars, in one all-reduce."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _all_gather_objects(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, obj)
        return parts
    return [obj]


def _to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "boxes", "box_labels")}
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return {"inputs": inputs, "targets": targets}


@dataclass
class TrainResult:
    """What a call of :func:`train` did (every process returns one; ``history`` is the main process's)."""

    step: int
    epoch: int
    total_steps: int
    finished: bool
    best_metric: float | None
    best_step: int | None
    run_dir: Path
    last_checkpoint: Path | None
    exports: dict[str, Path] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True


class RunLogger:
    """Main-process logging: ``metrics.jsonl`` (every step: loss terms, gradient norm, learning rate per
    group, wall-clock ``time``), TensorBoard and the console (``log_every``).

    On resume, lines of ``metrics.jsonl`` past the resumed step (written after the last checkpoint of an
    interrupted run) are dropped, so the file always holds one line per step of the run's history.
    """

    def __init__(self, cfg: TrainConfig, main: bool, total: int, start_step: int, group_names: list[str]):
        self.cfg, self.main, self.names = cfg, main, group_names
        self.writer = self.bar = None
        if not main:
            return
        from medsam3.io.atomic import write_text_atomic

        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        kept = [r for r in read_metrics(cfg.run_dir) if r.get("step", 0) <= start_step]
        if kept:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            self.path.write_text("", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"), purge_step=start_step + 1)
        if cfg.progress:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("loss {task.fields[loss]}"),
                console=Console(stderr=True),
            )
            self.bar_task = self.bar.add_task("train", total=total, completed=start_step, loss="")
            self.bar.start()

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def step(
        self,
        step: int,
        epoch: int,
        terms: dict[str, float],
        lrs: list[float],
        grad_norm: float | None,
        result: TrainResult,
    ) -> None:
        if not self.main:
            return
        lr: dict[str, float] = {}
        for name, value in zip(self.names, lrs, strict=True):
            lr.setdefault(name.removesuffix(".no_decay"), value)
        record = {
            "step": step,
            "epoch": epoch,
            **terms,
            "grad_norm": grad_norm,
            "lr": lr,
            "time": time.time(),
        }
        self._append(record)
        result.history.append(record)
        if self.bar is not None:
            self.bar.update(self.bar_task, advance=1, loss=f"{terms.get('loss', float('nan')):.4f}")
        if step % self.cfg.log_every == 0 or step == 1:
            if self.writer is not None:
                for k, v in terms.items():
                    self.writer.add_scalar(f"train/{k}", v, step)
                for k, v in lr.items():
                    self.writer.add_scalar(f"lr/{k}", v, step)
                if grad_norm is not None:
                    self.writer.add_scalar("train/grad_norm", grad_norm, step)
            if self.bar is None:
                log.info("step %d epoch %d loss %.4f", step, epoch, terms.get("loss", float("nan")))

    def validation(self, step: int, metrics, result: TrainResult) -> None:
        if not self.main:
            return
        record = {"step": step, "val": metrics.to_dict()}
        self._append(record)
        result.validations.append(record)
        if self.writer is not None:
            self.writer.add_scalar("val/dice_mean", metrics.mean, step)
            for d, v in metrics.per_dataset.items():
                self.writer.add_scalar(f"val/dice/{d}", v, step)
        shown = ", ".join(f"{d} {v:.3f}" for d, v in metrics.per_dataset.items())
        log.info("step %d validation Dice %.4f (%s) on %d items", step, metrics.mean, shown, metrics.items)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.writer is not None:
            self.writer.close()


def _prepare_run_dir(cfg: TrainConfig, resume_from: Path | None, payload: dict | None) -> Path:
    """Check the run folder against the configuration (main process) and write ``config.yaml``."""
    from medsam3.io.atomic import write_text_atomic

    run_dir = Path(cfg.run_dir)
    if resume_from is None and (checkpoint_dir(run_dir) / LAST).exists():
        raise InputError(
            run_dir,
            "already holds a training run (checkpoints/last.pt); resume it with "
            "resume=auto, or choose another run_dir",
        )
    if payload is not None:
        # fields added since the checkpoint was written take their defaults there
        try:
            saved = config_to_dict(config_from_dict(payload["config"]))
        except InputError:
            saved = payload["config"]
        changed = [k for k in config_differences(saved, config_to_dict(cfg)) if k not in RUN_CONTROL_KEYS]
        if changed:
            raise InputError(
                resume_from,
                f"was written with another configuration ({', '.join(changed)}); "
                "resume with the same settings or start a new run_dir",
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_yaml(cfg))
    return run_dir


def _fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (``accelerate launch`` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _enable_cpu_fsdp(acc) -> None:
    """Turn ``acc`` (CPU processes, gloo) into an FSDP2 accelerator.

    accelerate promotes only accelerator backends (GPU, XPU, ...) to FSDP and drops the FSDP plugin on
    CPU; torch's FSDP2 (``fully_shard``) runs on CPU with gloo, so the plugin is built from the launch
    environment (``FSDP_*`` variables) and put in place before ``acc.prepare``.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise InputError(
            None,
            "FSDP on CPU needs FSDP2 (FSDP_VERSION=2 / fsdp_version: 2 in the accelerate "
            f"config), got version {plugin.fsdp_version}",
        )
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or continue) the training described by ``cfg``; see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType
    from torch.utils.data import DataLoader

    from medsam3.data.clips import ClipSampler
    from medsam3.data.manifest import check_records, read_manifest
    from medsam3.data.sampler import SliceSampleDataset, SliceSampler
    from medsam3.train.batches import ItemLoader, collate, count_targets, verify_records
    from medsam3.train.clips import ClipLoader, clips_to_device, collate_clips, count_clip_targets
    from medsam3.train.cpu_autocast import geometry_encoder_in_fp32
    from medsam3.train.optim import build_optimizer, build_scheduler, parameter_groups, trainable_summary
    from medsam3.train.validate import validate_now, validation_items
    from medsam3.train.validate_volumes import run_volume_validation, volume_items
    from medsam3.train.video_model import VideoTrainModule

    if not cfg.data.manifest:
        raise InputError(None, "config: data.manifest is required (a manifest from `medsam3 prepare`)")
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # Without a GPU, several processes (torchrun, accelerate launch) need accelerate's CPU mode (gloo).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    acc = Accelerator(
        mixed_precision=precision,
        cpu=launched and not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if acc.distributed_type == DistributedType.MULTI_CPU and _fsdp_requested():
        _enable_cpu_fsdp(acc)
    rank, world = acc.process_index, acc.num_processes
    main = acc.is_main_process

    # 1. everything checked before step 1 ---------------------------------------------------------------
    records = read_manifest(cfg.data.manifest)
    if cfg.data.datasets:
        unknown = sorted(set(cfg.data.datasets) - {r.dataset for r in records})
        if unknown:
            raise InputError(cfg.data.manifest, f"has no dataset {unknown[0]!r} (data.datasets)")
        records = [r for r in records if r.dataset in set(cfg.data.datasets)]
    check_records(records, check_files=False)  # the manifest as a whole; files are checked below, shared out
    problems = []
    try:
        verify_records(records[rank::world], cfg.data.verify)
    except InputError as exc:
        problems.append(str(exc))
    problems = [p for part in _all_gather_objects(problems) for p in part]
    if problems:
        raise InputError(None, problems[0])
    video = cfg.model.kind == "video"
    stream: dict[str, Any] = dict(
        seed=cfg.seed,
        negative_fraction=cfg.data.negative_fraction,
        temperature=cfg.data.temperature,
        group_temperature=cfg.data.group_temperature,
        cross_group_negatives=cfg.data.cross_group_negatives,
        cross_group_share=cfg.data.cross_group_share,
    )
    if video:
        sampler: SliceSampler = ClipSampler(
            records, "train", length=cfg.clips.length, stride=cfg.clips.stride, **stream
        )
    else:
        sampler = SliceSampler(records, "train", **stream)
    sam3, processor = build_model(cfg)
    if precision == "bf16" and acc.device.type == "cpu":
        geometry_encoder_in_fp32(sam3)  # its box pooling fails under CPU autocast (train.cpu_autocast)
    size = training_input_size(sam3)
    groups = parameter_groups(sam3, cfg.optim)
    optimizer = build_optimizer(groups, cfg.optim, acc.device.type)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    if cfg.steps_per_epoch:
        steps_per_epoch = cfg.steps_per_epoch
    elif video:
        steps_per_epoch = math.ceil(sampler.clips_per_epoch() / global_batch)  # type: ignore[attr-defined]
    else:
        steps_per_epoch = default_steps_per_epoch(records, "train", global_batch)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    loss_fn = build_video_loss(cfg) if video else build_loss(cfg)
    val_items: list[Any] = []
    if cfg.data.val_max_items:
        pick = volume_items if video else validation_items
        val_items = list(pick(records, cfg.data.val_split, cfg.data.val_max_items, cfg.data.val_seed))

    resume_from = find_resume_checkpoint(cfg.run_dir, cfg.resume)
    payload = load_checkpoint(resume_from) if resume_from is not None else None
    if main:
        _prepare_run_dir(cfg, resume_from, payload)
    acc.wait_for_everyone()

    # 2. resume -----------------------------------------------------------------------------------------
    step, best, best_step, epoch = 0, None, None, 0
    if payload is not None:
        sam3.load_state_dict(payload["model"])
        sampler.load_state_dict(payload["sampler"])
        step, epoch = int(payload["step"]), int(payload.get("epoch", 0))
        best, best_step = payload.get("best_metric"), payload.get("best_step")
        if main:
            log.info("resuming from step %d (checkpoint %s)", step, resume_from)
    aux = cfg.loss.kind == "sam3" and cfg.loss.aux_loss
    module: torch.nn.Module
    if video:
        module = VideoTrainModule(
            sam3,
            aux=aux,
            checkpoint_frames=cfg.clips.checkpoint_frames,
            meta_text_cls=cfg.model.meta_text_cls,
        )
    else:
        module = Sam3TrainModule(sam3, cfg.model.meta_text_cls, aux=aux)
    module, optimizer = acc.prepare(module, optimizer)
    if payload is not None:
        load_optimizer_state(acc, module, optimizer, payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler") is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(payload["scaler"])
        states = payload.get("rng") or []
        if states:
            set_rng_state(states[rank] if len(states) == world else states[0])
    if acc.distributed_type == DistributedType.FSDP and main:
        log.warning("FSDP: checkpoints gather the full model and optimizer state on every save")
    if acc.distributed_type == DistributedType.FSDP and video and val_items:
        raise InputError(
            None, "config: 3D validation of a video model does not run under FSDP; set data.val_max_items=0"
        )

    loader = ItemLoader(
        records,
        size,
        processor.tokenizer,
        seed=cfg.seed,
        box_prompt_fraction=0.0 if video else cfg.box_prompt_fraction,
        box_noise_std=cfg.box_noise_std,
        box_noise_max=cfg.box_noise_max,
        cache_volumes=cfg.data.cache_volumes,
        augment=None if video else cfg.data.augment,
    )
    load: Any = loader
    if video:
        load = ClipLoader(
            loader,
            seed=cfg.seed,
            box_prompt_fraction=cfg.box_prompt_fraction,
            box_noise_std=cfg.box_noise_std,
            box_noise_max=cfg.box_noise_max,
            augment=cfg.data.augment,
            per_frame=cfg.clips.augment_per_frame,
            gt_init_fraction=cfg.clips.gt_init_fraction,
        )
    dataset = SliceSampleDataset(sampler, batch_size=cfg.batch_size, load=load, rank=rank, world_size=world)
    data = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        collate_fn=collate_clips if video else collate,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=acc.device.type == "cuda",
    )
    start_position = sampler.position

    logger = RunLogger(cfg, main, total, step, [g["name"] for g in optimizer.param_groups])
    if main:
        summary = trainable_summary(sam3)
        log.info(
            "training %s: %d of %d parameters trainable; %d steps (%d per epoch), global batch %d on %d "
            "process(es)",
            cfg.mode,
            summary["trainable"],
            summary["total"],
            total,
            steps_per_epoch,
            global_batch,
            world,
        )
    result = TrainResult(step, epoch, total, False, best, best_step, Path(cfg.run_dir), None, is_main=main)

    # 3. steps ------------------------------------------------------------------------------------------
    batches = iter(data)
    first = step
    deadline = None if cfg.stop_after_minutes is None else time.monotonic() + 60.0 * cfg.stop_after_minutes
    out_of_time = False
    while step < total and (cfg.stop_after is None or step - first < cfg.stop_after) and not out_of_time:
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        counts = count_clip_targets(micro) if video else [float(count_targets(micro))]
        n_global = [c / (world * cfg.grad_accum) for c in _all_reduce_sums(counts, acc.device)]
        module.train()
        sums: dict[str, float] = {}
        for m, batch in enumerate(micro):
            seed_micro_batch(cfg.seed, (step * cfg.grad_accum + m) * world + rank)
            moved = clips_to_device(batch, acc.device) if video else _to_device(batch, acc.device)
            sync = acc.no_sync(module) if m < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                outputs = module(**moved["inputs"])
                if video:
                    terms = loss_fn(
                        outputs,
                        moved["targets"],
                        moved["track_targets"],
                        max(n_global[0], 1.0),
                        max(n_global[1], 1.0),
                    )
                else:
                    terms = loss_fn(outputs, moved["targets"], max(n_global[0], 1.0))
            acc.backward(terms["loss"] / cfg.grad_accum)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        grad_norm = None
        if cfg.optim.grad_clip > 0:
            grad_norm = float(acc.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip))
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        epoch = step // steps_per_epoch
        terms_mean = _all_reduce_mean(sums, acc.device)
        logger.step(step, epoch, terms_mean, lrs, grad_norm, result)

        end_of_epoch = step % steps_per_epoch == 0
        if deadline is not None:  # every process must stop at the same step
            out_of_time = _all_reduce_sum(float(time.monotonic() >= deadline), acc.device) > 0
        last_step = (
            step == total or (cfg.stop_after is not None and step - first >= cfg.stop_after) or out_of_time
        )
        metrics = None
        due = step % cfg.val_every == 0 if cfg.val_every else end_of_epoch
        if val_items and (due or step == total):
            if video:
                metrics = run_volume_validation(
                    acc.unwrap_model(module).sam3,
                    processor,
                    loader,
                    val_items,
                    mode=cfg.clips.val_mode,
                    clip_length=cfg.clips.val_clip_length,
                    probes=cfg.clips.val_probes,
                    rank=rank,
                    world_size=world,
                )
            else:
                metrics = validate_now(acc, module, loader.plain, collate, val_items, size, cfg.batch_size)
            logger.validation(step, metrics, result)
            if best is None or metrics.mean > best:
                best, best_step = metrics.mean, step
        if (
            metrics is not None
            or last_step
            or (cfg.save_every and step % cfg.save_every == 0)
            or (not cfg.save_every and end_of_epoch)
        ):
            position = start_position + (step - first) * cfg.grad_accum * cfg.batch_size * world
            result.last_checkpoint = save_training_state(
                acc,
                module,
                optimizer,
                scheduler,
                sampler,
                position,
                step,
                epoch,
                best,
                best_step,
                metrics,
                config_to_dict(cfg),
                is_best=metrics is not None and best_step == step,
                keep_last=cfg.keep_last,
                run_dir=cfg.run_dir,
            )
    if out_of_time and step < total and main:
        log.info(
            "stopped at step %d of %d after %.4g minutes (stop_after_minutes); run again to continue",
            step,
            total,
            cfg.stop_after_minutes,
        )
    result.step, result.epoch, result.best_metric, result.best_step = step, epoch, best, best_step
    result.finished = step >= total
    if result.finished:
        result.exports = export_run_models(acc, module, processor, cfg, best_step)
    logger.close()
    acc.wait_for_everyone()
    return result


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-step records of ``run_dir/metrics.jsonl`` (loss terms, learning rates, validations)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
