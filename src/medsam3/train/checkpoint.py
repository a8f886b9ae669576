"""Training checkpoints: one dict per file, written atomically, enough to resume the run exactly.

A checkpoint (``torch.save`` of a dict, loadable with ``weights_only=True``) holds:

``version``      format version (:data:`CHECKPOINT_VERSION`)
``model``        state dict of the trained ``Sam3Model`` (with its LoRA adapter weights in LoRA mode)
``optimizer``    AdamW state; ``scheduler`` the LR scheduler state; ``scaler`` the fp16 scaler (or None)
``sampler``      the training stream position (:class:`medsam3.data.sampler.SliceSampler` state)
``rng``          one :func:`rng_state` per process (Python ``random``, NumPy, torch CPU and CUDA generators)
``step``         optimizer updates done; ``epoch`` epochs completed
``best_metric``  best validation Dice so far (``None`` before the first validation) and ``best_step``
``metrics``      the latest validation result
``config``       the resolved :class:`~medsam3.train.config.TrainConfig` as a dict

Files in ``<run_dir>/checkpoints/``: ``last.pt`` (rewritten at every save), ``best.pt`` (a hard link to the
checkpoint with the best validation Dice; a copy where links are not supported) and, with ``keep_last``,
numbered ``step_0000100.pt`` files of which the newest ``keep_last`` are kept. Each file is written to a
temporary name in the same folder and renamed, so a crash never leaves a partial checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medsam3.errors import InputError
from medsam3.io.atomic import atomic_path
from medsam3.model.concepts import record_trained_concepts
from medsam3.train.model import build_model

if TYPE_CHECKING:
    from transformers import Sam3Model

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LAST, BEST = "last.pt", "best.pt"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """The process's random generator states, as tensors and plain values (``weights_only`` safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global generator)
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where as many devices exist)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["gauss"]))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """``torch.save(payload)`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    payload = {"version": CHECKPOINT_VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise InputError(path, f"cannot read the training checkpoint ({exc})") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise InputError(path, "not a medsam3 training checkpoint (missing or unknown 'version')")
    needed = ("model", "optimizer", "scheduler", "sampler", "step", "config")
    missing = [k for k in needed if k not in payload]
    if missing:
        raise InputError(path, f"training checkpoint lacks {', '.join(missing)}")
    return payload


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s content atomically (hard link, else copy), replacing ``dst``."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_run_checkpoint(
    run_dir: str | Path, payload: dict[str, Any], *, is_best: bool, keep_last: int
) -> Path:
    """Write ``last.pt`` (and ``best.pt`` / a numbered file) for a run; returns the ``last.pt`` path."""
    folder = checkpoint_dir(run_dir)
    last = save_checkpoint(folder / LAST, payload)
    if is_best:
        _link_or_copy(last, folder / BEST)
    if keep_last > 0:
        _link_or_copy(last, folder / f"step_{int(payload['step']):07d}.pt")
        numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NUMBERED.match(p.name)))
        for _, old in numbered[:-keep_last]:
            old.unlink()
    return last


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to continue from: ``auto`` -> ``last.pt`` if present, ``never`` -> None, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        last = checkpoint_dir(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise InputError(path, "checkpoint to resume from not found")
    return path


# --------------------------------------------------------------------------------------------------
# the state of a running training (accelerate), and the exported models (``run_dir/export/{final,best}``)


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def model_state(acc, module) -> dict[str, torch.Tensor]:
    """Full state dict of the trained ``Sam3Model`` inside the prepared training module (CPU tensors).

    Under FSDP the shards are gathered (every process must call this); keys are ``Sam3Model`` keys.
    """
    state = acc.get_state_dict(module)
    prefix = "sam3."
    return {k.removeprefix(prefix): v.detach().cpu() for k, v in (state or {}).items()}


def optimizer_state(acc, module, optimizer) -> dict[str, Any]:
    """The optimizer state: ``optimizer.state_dict()``, or the gathered full state under FSDP."""
    if _is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        return get_optimizer_state_dict(
            module, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(acc, module, optimizer, state: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_state`."""
    if _is_fsdp(acc):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        # parameters that never received a gradient (unused by the forward) have no saved state; torch
        # first fills every parameter's state (a zero-gradient step at lr 0), so those entries are dropped
        # again: Adam must start their step count at 0 as in a run that never stopped
        set_optimizer_state_dict(
            module, inner, state, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        saved = state["state"]
        for name, param in module.named_parameters():
            if name not in saved:
                inner.state.pop(param, None)
        return
    optimizer.load_state_dict(state)


def save_training_state(
    acc,
    module,
    optimizer,
    scheduler,
    sampler,
    position: int,
    step: int,
    epoch: int,
    best: float | None,
    best_step: int | None,
    metrics: Any,
    config: dict[str, Any],
    *,
    is_best: bool,
    keep_last: int,
    run_dir: str | Path,
) -> Path:
    """Gather everything (all processes call this) and write the run's checkpoint on the main process."""
    model = model_state(acc, module)
    optim = optimizer_state(acc, module, optimizer)
    rng: list[Any] = [None] * acc.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_gather_object(rng, rng_state())
    else:
        rng = [rng_state()]
    sampler_state = sampler.state_dict()
    sampler_state["position"] = int(position)
    path = checkpoint_dir(run_dir) / LAST
    if acc.is_main_process:
        payload = {
            "model": model,
            "optimizer": optim,
            "scheduler": scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "sampler": sampler_state,
            "rng": rng,
            "step": int(step),
            "epoch": int(epoch),
            "best_metric": best,
            "best_step": best_step,
            "metrics": None if metrics is None else metrics.to_dict(),
            "config": config,
        }
        path = write_run_checkpoint(run_dir, payload, is_best=is_best, keep_last=keep_last)
    acc.wait_for_everyone()
    return path


def export_model(
    template: Sam3Model, state: dict[str, torch.Tensor] | None, processor: Any, out_dir: str | Path
) -> Path:
    """Write a ``medsam3 segment``-loadable folder (``save_sam3``) of ``template`` with ``state`` loaded.

    ``template`` (a ``Sam3Model``, possibly with LoRA adapters) is not changed; adapters are merged into
    the exported weights, which are written in float32.
    """
    import copy

    from medsam3.model.loading import save_sam3
    from medsam3.train.lora import has_lora, merge_lora

    model = copy.deepcopy(template)
    if state is not None:
        model.load_state_dict(state)
    if has_lora(model):
        model = merge_lora(model)
    model = model.float().eval()
    return save_sam3(model, processor, out_dir, overwrite=True)


def export_run_models(acc, module, processor, cfg, best_step: int | None) -> dict[str, Path]:
    """Write ``run_dir/export/final`` and / or ``best`` (``cfg.export``); every process must call this."""
    from dataclasses import replace

    if cfg.export == "none":
        return {}
    final_state = model_state(acc, module)
    out: dict[str, Path] = {}
    if acc.is_main_process:
        if _is_fsdp(acc):
            template, _ = build_model(replace(cfg, model=replace(cfg.model, activation_checkpointing=False)))
        else:
            template = acc.unwrap_model(module).sam3
        folder = Path(cfg.run_dir) / "export"
        if cfg.export in ("final", "both"):
            out["final"] = export_model(template, final_state, processor, folder / "final")
        if cfg.export in ("best", "both"):
            best_file = checkpoint_dir(cfg.run_dir) / BEST
            if best_step is not None and best_file.is_file():
                state = load_checkpoint(best_file)["model"]
                out["best"] = export_model(template, state, processor, folder / "best")
            else:
                log.warning("no validation ran: the best model is the final one")
                out["best"] = export_model(template, final_state, processor, folder / "best")
        for name, path in out.items():
            record_trained_concepts(path, cfg)  # concepts.json: what the model knows (medsam3.model.concepts)
            log.info("exported the %s model to %s (medsam3 segment --model %s)", name, path, path)
    acc.wait_for_everyone()
    return out
