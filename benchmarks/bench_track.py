"""Benchmark: tracking a concept through a volume, bounded (``track_volume``) vs transformers' own loop (CPU).

Variants, each run in its own fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own:

* ``transformers``: ``Sam3VideoProcessor.init_video_session(video=...)`` (all slices preprocessed up front
  and kept as float tensors), ``add_text_prompt``, ``propagate_in_video_iterator`` forward from the start
  slice then reverse, ``postprocess_outputs`` per slice; nothing is freed during the run.
* ``track``: :func:`medsam3.predict.volume.track.track_volume` with the same start slice (slices streamed
  to the session, per-slice state pruned to the tracker's reach; same masks, checked by the tests).
* ``track-w4``: the same with ``max_frames_in_memory=4`` (a shorter memory than the tracker reads).

For each volume length ``Z`` (default 16 and 64 slices, random 64 x 64 slices, start at ``Z // 4``) the run
reports seconds per slice, the session's tensor bytes at its peak (masks, memory features, cached image
features, stored frames; :func:`medsam3.model.video.session_tensor_bytes`) and the process's peak RSS.

``--prompts N`` instead compares N prompts in one shared session (image features once per slice) with one
session per prompt (image features once per slice and prompt), at one length.

The model is the tiny random video model (``tiny_sam3_video_config``, 224 px) with the test thresholds
(detection 0, new object 0, no hot-start, association 0, one query per slice) and the tracker's object-score
head biased up, so that one object is tracked through every slice; with the default thresholds random
weights find nothing and nothing is stored. Absolute numbers say nothing about the released 848M model.

``--size 1008`` keeps the tiny widths but runs at SAM3's input size, where stored frames, masks and memory
features have their real spatial sizes (FPN 128 channels instead of 256, so image features are half).

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_track.py [--lengths 16 64] [--queries 1]
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_track.py --prompts 3 --lengths 16
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_track.py --size 1008 --lengths 6 12

Writes ``benchmarks/results/track[_prompts][_1008]_cpu.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = ["hippocampus", "liver", "left kidney", "spleen", "aorta"]


def build(queries: int, size: int = 224):
    import torch
    from transformers import Sam3VideoModel

    from medsam3.model.configs import OPEN_VIDEO_THRESHOLDS, sam3_video_config, small_sam3_config
    from medsam3.model.loading import build_processor

    # the tiny configuration; at 1008 px (the released input size) with 24-token attention windows
    detector = small_sam3_config(image_size=size, window_size=8 if size == 224 else 24)
    config = sam3_video_config(detector, memory_attention_layers=1, **OPEN_VIDEO_THRESHOLDS)
    config.detector_config.detr_decoder_config.num_queries = queries
    torch.manual_seed(0)
    model = Sam3VideoModel(config).eval()
    with torch.no_grad():
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    return model, build_processor(config, video=True)


def run_variant(variant: str, length: int, queries: int, prompts: int, size: int) -> dict:
    """One measurement in this process (called in a subprocess by :func:`main`)."""
    import numpy as np
    import torch

    from medsam3.model.video import session_tensor_bytes
    from medsam3.predict.volume.track import track_volume, track_volume_prompts

    torch.set_num_threads(2)
    model, processor = build(queries, size)
    frames = np.random.default_rng(0).integers(0, 256, (length, 64, 64, 3), dtype=np.uint8)
    start = length // 4
    texts = PROMPTS[:prompts]
    calls = []
    original = model.detector_model.get_vision_features
    model.detector_model.get_vision_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    peak = [0]

    def watch(p) -> None:
        peak[0] = max(peak[0], p.state_bytes)

    t0 = time.perf_counter()
    if variant == "transformers":
        session = processor.init_video_session(video=list(frames), inference_device="cpu")
        processor.add_text_prompt(session, texts)
        for reverse in (False, True):
            for out in model.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
                processor.postprocess_outputs(session, out)
                peak[0] = max(peak[0], session_tensor_bytes(session))
    elif variant in ("track", "track-w4"):
        window = 4 if variant == "track-w4" else None
        track_volume_prompts(
            model, processor, frames, texts, start_frames=[start], max_frames_in_memory=window, progress=watch
        )
    elif variant == "separate":
        for text in texts:
            track_volume(model, processor, frames, text, start_frames=[start], progress=watch)
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "length": length,
        "s_per_slice": seconds / length,
        "state_mib": peak[0] / 2**20,
        "rss_mib": rss,
        "image_encoder_calls": len(calls),
    }


def measure(variant: str, length: int, queries: int, prompts: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(length), str(queries), str(prompts), str(size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument(
        "--size",
        type=int,
        choices=(224, 1008),
        default=224,
        help="model input size: 224 (tiny) or 1008 (tiny widths at SAM3's input size)",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, length, queries, prompts, size = args.child
        print(json.dumps(run_variant(variant, int(length), int(queries), int(prompts), int(size))))
        return
    variants = ["track", "separate"] if args.prompts > 1 else ["transformers", "track", "track-w4"]
    rows = [measure(v, n, args.queries, args.prompts, args.size) for n in args.lengths for v in variants]
    stem = ("track_prompts" if args.prompts > 1 else "track") + ("_1008" if args.size == 1008 else "")
    name = stem + "_cpu.md"
    lines = [
        f"# Track mode on CPU ({platform.processor() or platform.machine()}, 2 threads)",
        "",
        f"Tiny random video model ({args.size} px), {args.queries} query per slice, "
        f"{args.prompts} prompt(s), random 64 x 64 slices, start at Z/4. "
        "Command: `python benchmarks/bench_track.py " + " ".join(sys.argv[1:]) + "`.",
        "",
        "| variant | Z | s / slice | session tensors at peak (MiB) | peak RSS (MiB) | image encoder calls |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['length']} | {r['s_per_slice']:.3f} | {r['state_mib']:.1f} | "
            f"{r['rss_mib']:.0f} | {r['image_encoder_calls']} |"
        )
    text = "\n".join(lines) + "\n"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
