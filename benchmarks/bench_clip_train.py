"""Clip training step of SAM3's video model against a 2D slice step of the same model's detector.

One optimizer step on random inputs (no data loading): the video model's clip forward
(:class:`medsam3.train.video_model.VideoTrainModule`, detector on every frame + tracker on frames 1..n-1),
SAM3's detector loss and the tracker terms, backward, AdamW; against the 2D step of training
(:class:`medsam3.train.model.Sam3TrainModule`) on the same detector with ``n`` slices as a batch. Reports
seconds per step, clips (or slice batches) per second and peak memory (CUDA allocator peak on a GPU, the
process's peak RSS growth on a CPU).

    python benchmarks/bench_clip_train.py --size tiny --frames 8 --steps 3            # CPU
    python benchmarks/bench_clip_train.py --size full --frames 8 --steps 3 --bf16     # GPU, 1008 px
    python benchmarks/bench_clip_train.py --size full --frames 8 --steps 3 --bf16 --checkpointing

:func:`clip_step_benchmark` is the function a GPU script calls (full size: the released architecture,
random weights, 1008 px).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch


def _model(size: str):
    from transformers import Sam3VideoModel

    from medsam3.model.configs import full_sam3_config, sam3_video_config, tiny_sam3_config

    config = sam3_video_config(tiny_sam3_config(), memory_attention_layers=1) if size == "tiny" else None
    if config is None:
        config = sam3_video_config(full_sam3_config())
    torch.manual_seed(0)
    model = Sam3VideoModel(config)
    model.train()
    return model


def _targets(n: int, s: int, device):
    masks = torch.zeros(n, 1, s, s, dtype=torch.bool, device=device)
    masks[:, :, s // 3 : s // 2, s // 3 : s // 2] = True
    box = torch.tensor([[5 / 12, 5 / 12, 1 / 6, 1 / 6]], device=device)
    return [{"boxes": box, "masks": masks[i]} for i in range(n)]


def clip_step_benchmark(
    size: str = "tiny",
    frames: int = 8,
    steps: int = 3,
    bf16: bool = False,
    checkpointing: bool = False,
    device: str | None = None,
) -> dict:
    """Seconds per step and peak memory of clip training vs 2D training of the same model (dict)."""
    from medsam3.model.video import video_input_size
    from medsam3.train.losses import Sam3Loss
    from medsam3.train.losses_track import track_losses
    from medsam3.train.model import Sam3TrainModule, enable_activation_checkpointing
    from medsam3.train.video_model import VideoTrainModule

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _model(size).to(dev)
    if checkpointing:
        enable_activation_checkpointing(model.detector_model)
    s = video_input_size(model)
    loss_fn = Sam3Loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator().manual_seed(0)
    px = torch.randn(1, frames, 3, s, s, generator=g).to(dev)
    ids = torch.randint(1, 1000, (1, 32), generator=g).to(dev)
    am = torch.ones(1, 32, dtype=torch.long, device=dev)
    targets = _targets(frames, s, dev)
    track_targets = torch.stack([t["masks"][0] for t in targets[1:]])
    clip = VideoTrainModule(model, aux=True, checkpoint_frames=checkpointing)
    flat = Sam3TrainModule(model.detector_model, meta_text_cls=True, aux=True)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def clip_step():
        with autocast:
            out = clip(
                px,
                torch.tensor([frames]),
                ids,
                am,
                init_masks=track_targets[:1],
                init_from_gt=torch.tensor([True]),
            )
            loss = loss_fn(out["detector"], targets)["loss"]
            tr = out["tracker"]
            loss = loss + sum(
                track_losses(
                    tr["pred_masks"], tr["iou"], tr["object_score_logits"], track_targets, frames - 1
                ).values()
            )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def slice_step():
        with autocast:
            out = flat(px[0], ids.expand(frames, -1), am.expand(frames, -1))
            loss = loss_fn(out, targets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    result = {}
    for name, step in (("slices_2d", slice_step), ("clip_video", clip_step)):
        step()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / steps
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        result[name] = {"seconds_per_step": sec, "steps_per_second": 1 / sec, "peak_mib": peak}
    result["setting"] = {
        "size": size,
        "frames": frames,
        "image_size": s,
        "bf16": bf16,
        "checkpointing": checkpointing,
        "device": str(dev),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "full"), default="tiny")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--device", default=None)
    a = p.parse_args()
    print(
        json.dumps(
            clip_step_benchmark(a.size, a.frames, a.steps, a.bf16, a.checkpointing, a.device), indent=2
        )
    )


if __name__ == "__main__":
    main()
