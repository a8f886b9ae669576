"""SAM3 configurations built in code: the full-size architecture and small ones for tests and CPUs.

The builders return ``transformers.Sam3Config`` (image model) or ``Sam3VideoConfig`` (detector + tracker)
objects; nested configs carry their ``model_type`` keys so that ``save_pretrained`` / ``from_pretrained``
round-trip them. :func:`vision_config`, :func:`vit_config` and :func:`vit_sizes` read the nested parts of a
built ``Sam3Config`` with their types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast, overload

from transformers import Sam3Config, Sam3VideoConfig, Sam3VisionConfig, Sam3ViTConfig


def vision_config(config: Sam3Config) -> Sam3VisionConfig:
    """The vision part of ``config``: a ``Sam3VisionConfig`` once the ``Sam3Config`` is built."""
    return cast(Sam3VisionConfig, config.vision_config)


def vit_config(config: Sam3Config) -> Sam3ViTConfig:
    """The ViT backbone's configuration, ``config.vision_config.backbone_config``."""
    return cast(Sam3ViTConfig, vision_config(config).backbone_config)


def vit_sizes(config: Sam3Config) -> tuple[int, int]:
    """``(image_size, patch_size)`` of the ViT in pixels (SAM3 inputs and patches are square: one int)."""
    vit = vit_config(config)
    return cast(int, vit.image_size), cast(int, vit.patch_size)


def full_sam3_config() -> Sam3Config:
    """The released SAM3 image model (1008 px, ViT-L-like 32 x 1024, 200 queries).

    The ViT LayerNorm eps is Meta's 1e-5 (transformers' default 1e-6 moves the FPN features by ~5e-4
    relative; see ``tests/slow/test_meta_equivalence.py``).
    """
    config = Sam3Config()
    vit_config(config).layer_norm_eps = 1e-5
    return config


def small_sam3_config(
    image_size: int = 224,
    patch_size: int = 14,
    vit_width: int = 64,
    vit_layers: int = 2,
    vit_heads: int = 2,
    window_size: int = 8,
    global_layers: tuple[int, ...] | None = None,
    fpn_width: int = 128,
    detector_width: int | None = None,
    detector_layers: int = 1,
    detector_heads: int = 4,
    num_queries: int = 8,
    text_width: int = 64,
    text_layers: int = 1,
    text_heads: int = 2,
    vocab_size: int = 49408,
    **overrides: Any,
) -> Sam3Config:
    """A small SAM3 image-model configuration (random weights run on a CPU in well under a second).

    Args:
        image_size: square input size in pixels (multiple of ``patch_size``).
        fpn_width: width of the FPN neck; also the detector width unless ``detector_width`` is given.
            128 keeps the configuration usable by the tracker / video model as well.
        vocab_size: text vocabulary size (49408 for the CLIP BPE vocabulary).
        overrides: top-level ``Sam3Config`` keyword overrides.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    grid = image_size // patch_size
    if global_layers is None:
        global_layers = (vit_layers - 1,)
    det = detector_width or fpn_width
    vision = {
        "model_type": "sam3_vision_model",
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": vit_width,
            "intermediate_size": 4 * vit_width,
            "num_hidden_layers": vit_layers,
            "num_attention_heads": vit_heads,
            "image_size": image_size,
            "patch_size": patch_size,
            "window_size": window_size,
            "global_attn_indexes": list(global_layers),
            "pretrain_image_size": image_size,
        },
        "fpn_hidden_size": fpn_width,
        "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
    }
    text = {
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "projection_dim": text_width,
        "num_hidden_layers": text_layers,
        "num_attention_heads": text_heads,
        "max_position_embeddings": 32,
    }

    def block(n: int, **kw: Any) -> dict[str, Any]:
        return {
            "hidden_size": det,
            "num_layers": n,
            "num_attention_heads": detector_heads,
            "intermediate_size": 4 * det,
            **kw,
        }

    return Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config={"model_type": "sam3_geometry_encoder", **block(detector_layers)},
        detr_encoder_config={"model_type": "sam3_detr_encoder", **block(detector_layers)},
        detr_decoder_config={
            "model_type": "sam3_detr_decoder",
            **block(detector_layers),
            "num_queries": num_queries,
        },
        mask_decoder_config={
            "model_type": "sam3_mask_decoder",
            "hidden_size": det,
            "num_attention_heads": detector_heads,
        },
        **overrides,
    )


def tiny_sam3_config(**overrides: Any) -> Sam3Config:
    """The smallest configuration the tests use: 224 px, widths 64/128, one layer each, 8 queries."""
    return small_sam3_config(**overrides)


def nano_sam3_config(**overrides: Any) -> Sam3Config:
    """The bundled compact model ``medsam3-nano``: 336 px, 10.9 M parameters, trained from scratch.

    ViT 192 wide x 6 layers (6 heads, windows of 8 x 8 patches, global attention in layers 2 and 5), FPN and
    detector 64 wide (2 encoder + 2 decoder layers, 4 heads, 20 queries), CLIP text encoder 128 wide x 2
    layers over the full CLIP vocabulary (6.3 M of the parameters are its token embeddings). Only the image
    model is trained (text and box prompts); it has no tracker weights for point prompts or track mode.
    ``configs/nano.yaml`` starts it (its ``model.size`` repeats these values, at 224 px: stages 1-5 train at
    224 px, and stage 6, ``configs/nano_stage6.yaml``, moves it to 336 px with a resampled position
    embedding).
    """
    values: dict[str, Any] = dict(
        image_size=336,
        vit_width=192,
        vit_layers=6,
        vit_heads=6,
        window_size=8,
        global_layers=(2, 5),
        fpn_width=64,
        detector_layers=2,
        detector_heads=4,
        num_queries=20,
        text_width=128,
        text_layers=2,
        text_heads=2,
    )
    values.update(overrides)
    return small_sam3_config(**values)


# --------------------------------------------------------------------------------------------------
# Video model (detector + tracker) configurations


def sam3_video_config(
    detector: Sam3Config,
    *,
    memory_attention_layers: int = 4,
    memory_attention_heads: int = 1,
    mask_decoder_layers: int = 2,
    mask_decoder_heads: int | None = None,
    num_maskmem: int = 7,
    memory_encoder_output_channels: int = 64,
    tracker_overrides: dict[str, Any] | None = None,
    **video_overrides: Any,
) -> Sam3VideoConfig:
    """A ``Sam3VideoConfig`` whose tracker fits ``detector`` (same image size, patch and FPN width).

    The tracker's widths follow the released model's ratios to the FPN width ``F`` (256 there): memory
    attention and SAM mask decoder feed-forward ``8F``, memory fuser ``4F``, mask decoder heads ``F / 32``.
    ``sam3_video_config(full_sam3_config())`` is the released architecture. The memory encoder's output
    stays 64 channels (the tracker's memory attention assumes it), and the low-resolution mask size is
    4 x the ViT grid (288 at 1008 px, 64 at 224 px).
    """
    vision = vision_config(detector)
    fpn = vision.fpn_hidden_size
    image_size, patch = vit_sizes(detector)
    tracker: dict[str, Any] = {
        "model_type": "sam3_tracker_video",
        "vision_config": vision.to_dict(),
        "prompt_encoder_config": {"hidden_size": fpn, "image_size": image_size, "patch_size": patch},
        "mask_decoder_config": {
            "hidden_size": fpn,
            "mlp_dim": 8 * fpn,
            "num_hidden_layers": mask_decoder_layers,
            "num_attention_heads": mask_decoder_heads or max(1, fpn // 32),
            "iou_head_hidden_dim": fpn,
        },
        "num_maskmem": num_maskmem,
        "memory_attention_hidden_size": fpn,
        "memory_attention_num_layers": memory_attention_layers,
        "memory_attention_num_attention_heads": memory_attention_heads,
        "memory_attention_feed_forward_hidden_size": 8 * fpn,
        "memory_encoder_hidden_size": fpn,
        "memory_encoder_output_channels": memory_encoder_output_channels,
        "mask_downsampler_embed_dim": fpn,
        "memory_fuser_embed_dim": fpn,
        "memory_fuser_intermediate_dim": 4 * fpn,
        "image_size": image_size,
        **(tracker_overrides or {}),
    }
    video_overrides.setdefault("low_res_mask_size", 4 * (image_size // patch))
    return Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker, **video_overrides)


#: Video-model settings under which random weights keep every detection and track it through every frame
#: (tests and benchmarks of the tiny and the synthetic models).
OPEN_VIDEO_THRESHOLDS: dict[str, Any] = dict(
    score_threshold_detection=0.0,
    new_det_thresh=0.0,
    hotstart_delay=0,
    hotstart_unmatch_thresh=0,
    hotstart_dup_thresh=0,
    assoc_iou_thresh=0.0,
    trk_assoc_iou_thresh=0.0,
)


def tiny_sam3_video_config(**video_overrides: Any) -> Sam3VideoConfig:
    """The tiny detector of :func:`tiny_sam3_config` with a one-layer memory attention (224 px, FPN 128)."""
    return sam3_video_config(tiny_sam3_config(), memory_attention_layers=1, **video_overrides)


# --------------------------------------------------------------------------------------------------
# Configuration of a Meta-layout checkpoint, read from its tensor shapes


def _count(shapes: Mapping[str, Sequence[int]], pattern: str) -> int:
    """Number of distinct indices ``(\\d+)`` captured by ``pattern`` over the keys (0 when none)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.fullmatch(k))})


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"the checkpoint lacks {key!r}, needed to read the architecture")
    return tuple(int(s) for s in shapes[key])


@overload
def infer_sam3_config(
    shapes: Mapping[str, Sequence[int]], *, with_tracker: Literal[False] = False
) -> Sam3Config: ...


@overload
def infer_sam3_config(
    shapes: Mapping[str, Sequence[int]], *, with_tracker: Literal[True]
) -> Sam3VideoConfig: ...


@overload
def infer_sam3_config(
    shapes: Mapping[str, Sequence[int]], *, with_tracker: bool
) -> Sam3Config | Sam3VideoConfig: ...


def infer_sam3_config(
    shapes: Mapping[str, Sequence[int]], *, with_tracker: bool = False
) -> Sam3Config | Sam3VideoConfig:
    """The transformers configuration of a checkpoint in Meta's layout, read from its tensor shapes.

    Args:
        shapes: full Meta keys (``detector.…``, ``tracker.…``) -> tensor shape.
        with_tracker: return a ``Sam3VideoConfig`` (detector + tracker) instead of a ``Sam3Config``.

    Widths, depths, vocabulary, image and patch size, window size and global-attention blocks, query count
    and FPN scales are read from the shapes (the ViT's image size, heads and windows from its stored
    rotary tables ``freqs_cis``). Like Meta's model, the ViT's LayerNorms use eps 1e-5 (transformers'
    default config says 1e-6) and the text encoder uses GELU. Head counts of the other
    attention layers are not stored in any weight; they follow the released model: 64-wide heads in the
    CLIP text encoder, 32-wide heads in the detector and the SAM mask decoder, one head in the memory
    attention. Checkpoints trained with other head counts need an explicit configuration.

    Raises:
        ValueError: a tensor needed to read the architecture is missing or inconsistent.
    """
    vit = "detector.backbone.vision_backbone.trunk."
    d_model, channels, patch, _ = _shape(shapes, vit + "patch_embed.proj.weight")
    n_pos = _shape(shapes, vit + "pos_embed")[1]
    pre_grid = round((n_pos - 1) ** 0.5)
    if pre_grid * pre_grid != n_pos - 1:
        raise ValueError(f"{vit}pos_embed has {n_pos} positions, not 1 + a square grid")
    depth = _count(shapes, re.escape(vit) + r"blocks\.(\d+)\.attn\.qkv\.weight")
    rope = [
        _shape(shapes, f"{vit}blocks.{i}.attn.freqs_cis")
        for i in range(depth)
        if f"{vit}blocks.{i}.attn.freqs_cis" in shapes
    ]
    if len(rope) != depth:
        raise ValueError(
            "the checkpoint lacks the ViT's rotary tables (blocks.N.attn.freqs_cis), needed to "
            "read its image size, window size and head count"
        )
    tokens = [r[0] for r in rope]
    grid, window = round(max(tokens) ** 0.5), round(min(tokens) ** 0.5)
    global_blocks = [i for i, n in enumerate(tokens) if n == grid * grid and window != grid]
    if not global_blocks:
        global_blocks = [depth - 1]
    vit_heads = d_model // (2 * rope[0][1])

    neck = "detector.backbone.vision_backbone.convs."
    n_scales = _count(shapes, re.escape(neck) + r"(\d+)\.conv_1x1\.weight")
    scales = []
    for i in range(n_scales):
        if f"{neck}{i}.dconv_2x2_0.weight" in shapes:
            scales.append(4.0)
        elif f"{neck}{i}.dconv_2x2.weight" in shapes:
            scales.append(2.0)
        else:  # no weights: 1x (identity) first, then 0.5x (max-pool)
            scales.append(1.0 if 1.0 not in scales else 0.5)
    fpn = _shape(shapes, neck + "0.conv_1x1.weight")[0]

    txt = "detector.backbone.language_backbone.encoder."
    vocab, text_width = _shape(shapes, txt + "token_embedding.weight")
    text_len = _shape(shapes, txt + "positional_embedding")[0]
    text_layers = _count(shapes, re.escape(txt) + r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight")
    text_mlp = _shape(shapes, txt + "transformer.resblocks.0.mlp.c_fc.weight")[0]
    text_proj = _shape(shapes, txt + "text_projection")[1]

    det = _shape(shapes, "detector.backbone.language_backbone.resizer.weight")[0]
    geo_layers = _count(shapes, r"detector\.geometry_encoder\.encode\.(\d+)\.linear1\.weight")
    enc_layers = _count(shapes, r"detector\.transformer\.encoder\.layers\.(\d+)\.linear1\.weight")
    dec_layers = _count(shapes, r"detector\.transformer\.decoder\.layers\.(\d+)\.linear1\.weight")
    queries = _shape(shapes, "detector.transformer.decoder.query_embed.weight")[0]
    upsampling = _count(shapes, r"detector\.segmentation_head\.pixel_decoder\.conv_layers\.(\d+)\.weight")

    def block(n: int, ff_key: str) -> dict[str, Any]:
        return {
            "hidden_size": det,
            "num_layers": n,
            "num_attention_heads": max(1, det // 32),
            "intermediate_size": _shape(shapes, ff_key)[0],
        }

    detector = Sam3Config(
        vision_config={
            "model_type": "sam3_vision_model",
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": d_model,
                "num_channels": channels,
                "intermediate_size": _shape(shapes, vit + "blocks.0.mlp.fc1.weight")[0],
                "num_hidden_layers": depth,
                "num_attention_heads": vit_heads,
                "image_size": grid * patch,
                "patch_size": patch,
                "window_size": window,
                "global_attn_indexes": global_blocks,
                "pretrain_image_size": pre_grid * patch,
                "layer_norm_eps": 1e-5,  # Meta's ViT LayerNorms (transformers' default is 1e-6)
            },
            "fpn_hidden_size": fpn,
            "scale_factors": scales,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],
        },
        text_config={
            "model_type": "clip_text_model",
            "vocab_size": vocab,
            "hidden_size": text_width,
            "intermediate_size": text_mlp,
            "projection_dim": text_proj,
            "num_hidden_layers": text_layers,
            "num_attention_heads": max(1, text_width // 64),
            "max_position_embeddings": text_len,
            "hidden_act": "gelu",
        },
        geometry_encoder_config={
            "model_type": "sam3_geometry_encoder",
            **block(geo_layers, "detector.geometry_encoder.encode.0.linear1.weight"),
        },
        detr_encoder_config={
            "model_type": "sam3_detr_encoder",
            **block(enc_layers, "detector.transformer.encoder.layers.0.linear1.weight"),
        },
        detr_decoder_config={
            "model_type": "sam3_detr_decoder",
            "num_queries": queries,
            **block(dec_layers, "detector.transformer.decoder.layers.0.linear1.weight"),
        },
        mask_decoder_config={
            "model_type": "sam3_mask_decoder",
            "hidden_size": det,
            "num_upsampling_stages": upsampling,
            "num_attention_heads": max(1, det // 32),
        },
    )
    if not with_tracker:
        return detector
    return _infer_video_config(shapes, detector)


def _infer_video_config(shapes: Mapping[str, Sequence[int]], detector: Sam3Config) -> Sam3VideoConfig:
    """Tracker part of :func:`infer_sam3_config` (``tracker.*`` keys)."""
    md = "tracker.sam_mask_decoder."
    hidden = _shape(shapes, md + "iou_token.weight")[1]
    fpn = vision_config(detector).fpn_hidden_size
    if hidden != fpn:
        raise ValueError(
            f"tracker width {hidden} differs from the FPN width {fpn}; transformers' video "
            "model needs them equal"
        )
    down = _count(shapes, r"tracker\.maskmem_backbone\.mask_downsampler\.encoder\.(\d+)\.weight")
    fuser = "tracker.maskmem_backbone.fuser.layers.0."
    kernel = _shape(shapes, fuser + "dwconv.weight")[-1]
    tracker_overrides = {
        "mask_decoder_config": {
            "hidden_size": hidden,
            "mlp_dim": _shape(shapes, md + "transformer.layers.0.mlp.lin1.weight")[0],
            "num_hidden_layers": _count(shapes, re.escape(md) + r"transformer\.layers\.(\d+)\.norm1\.weight"),
            "num_attention_heads": max(1, hidden // 32),
            "attention_downsample_rate": hidden
            // _shape(shapes, md + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0],
            "num_multimask_outputs": _shape(shapes, md + "mask_tokens.weight")[0] - 1,
            "iou_head_depth": _count(shapes, re.escape(md) + r"iou_prediction_head\.layers\.(\d+)\.weight"),
            "iou_head_hidden_dim": _shape(shapes, md + "iou_prediction_head.layers.0.weight")[0],
        },
        "prompt_encoder_config": {
            "hidden_size": hidden,
            "image_size": vit_sizes(detector)[0],
            "patch_size": vit_sizes(detector)[1],
            "mask_input_channels": _shape(shapes, "tracker.sam_prompt_encoder.mask_downscaling.3.weight")[0],
            "num_point_embeddings": _count(
                shapes, r"tracker\.sam_prompt_encoder\.point_embeddings\.(\d+)\.weight"
            ),
        },
        "memory_attention_feed_forward_hidden_size": _shape(
            shapes, "tracker.transformer.encoder.layers.0.linear1.weight"
        )[0],
        "memory_encoder_hidden_size": _shape(shapes, "tracker.maskmem_backbone.pix_feat_proj.weight")[0],
        "mask_downsampler_embed_dim": _shape(shapes, "tracker.maskmem_backbone.pix_feat_proj.weight")[0],
        # (conv, norm) pairs of stride 2, then a 1x1 conv: 2n + 1 weighted entries for n layers
        "mask_downsampler_total_stride": 2 ** ((down - 1) // 2),
        "memory_fuser_num_layers": _count(shapes, r"tracker\.maskmem_backbone\.fuser\.layers\.(\d+)\.gamma"),
        "memory_fuser_intermediate_dim": _shape(shapes, fuser + "pwconv1.weight")[0],
        "memory_fuser_kernel_size": kernel,
        "memory_fuser_padding": kernel // 2,
    }
    return sam3_video_config(
        detector,
        memory_attention_layers=_count(
            shapes, r"tracker\.transformer\.encoder\.layers\.(\d+)\.linear1\.weight"
        ),
        num_maskmem=_shape(shapes, "tracker.maskmem_tpos_enc")[0],
        memory_encoder_output_channels=_shape(shapes, "tracker.maskmem_backbone.out_proj.weight")[0],
        tracker_overrides=tracker_overrides,
    )


# --------------------------------------------------------------------------------------------------
# Input size of a video model, and Medical SAM3 V2's settings

#: Medical SAM3 V2 runs SAM3's video model at this input size.
V2_IMAGE_SIZE = 504
#: Medical SAM3 V2's video-model settings besides the input size: hot-start off, Meta's detection and
#: association thresholds for the video model with temporal disambiguation.
V2_VIDEO_SETTINGS: dict[str, Any] = {
    "hotstart_delay": 0,
    "hotstart_unmatch_thresh": 0,
    "hotstart_dup_thresh": 0,
    "score_threshold_detection": 0.5,
    "new_det_thresh": 0.7,
    "assoc_iou_thresh": 0.1,
    "det_nms_thresh": 0.1,
    "fill_hole_area": 16,
    "recondition_every_nth_frame": 16,
    "min_trk_keep_alive": -1,
    "max_trk_keep_alive": 30,
    "init_trk_keep_alive": 30,
}


def set_video_input_size(config: Sam3VideoConfig, size: int) -> dict[str, list[Any]]:
    """Set a ``Sam3VideoConfig``'s square input size and every size that depends on it, in place.

    ``g = size / patch`` is the ViT grid. Set: the detector's and the tracker's image size (ViT, RoPE grid,
    prompt encoder), the detector's and the tracker's FPN feature sizes ``4g, 2g, g`` (transformers derives
    the tracker's, not the detector's), the memory attention's RoPE grid ``g``, and the video model's
    ``low_res_mask_size`` ``4g`` (not derived by transformers). Derived by the tracker from its image size:
    its mask-input size ``4g`` and the size its memory encoder resizes masks to, ``16g`` (Meta's
    ``interpol_size``: 1152 at 1008 px, 576 at 504 px). A position embedding learnt for the whole grid
    (``pretrain_image_size == image_size``) follows the new grid (``pretrain_image_size`` becomes ``size``;
    the caller resamples the weights, :func:`medsam3.model.input_size.resample_grid`); a tiled one (Meta's
    24 x 24 at 336 px) is kept and tiled over the new grid.

    Returns:
        name -> ``[old, new]`` of every setting changed.
    """
    detector: Any = config.detector_config
    tracker: Any = config.tracker_config
    vit: Any = vit_config(detector)
    patch = int(vit.patch_size)
    if size <= 0 or size % patch:
        raise ValueError(f"input size {size} is not a positive multiple of the patch size {patch}")
    grid = size // patch
    before = {
        "image_size": int(vit.image_size),
        "pretrain_image_size": int(vit.pretrain_image_size),
        "detector_feature_sizes": [list(s) for s in vision_config(detector).backbone_feature_sizes or []],
        "tracker_feature_sizes": [list(s) for s in tracker.vision_config.backbone_feature_sizes],
        "low_res_mask_size": int(config.low_res_mask_size),
        "memory_attention_rope_feat_sizes": list(tracker.memory_attention_rope_feat_sizes),
    }
    matched = int(vit.pretrain_image_size) == int(vit.image_size)
    config.image_size = size
    sizes = [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]
    vision_config(detector).backbone_feature_sizes = sizes
    tracker.image_size = size
    tracker_vit = tracker.vision_config.backbone_config
    tracker_vit.image_size = size
    if matched:
        vit.pretrain_image_size = size
        tracker_vit.pretrain_image_size = size
    config.low_res_mask_size = 4 * grid
    after = {
        "image_size": size,
        "pretrain_image_size": int(vit.pretrain_image_size),
        "detector_feature_sizes": sizes,
        "tracker_feature_sizes": [list(s) for s in tracker.vision_config.backbone_feature_sizes],
        "low_res_mask_size": 4 * grid,
        "memory_attention_rope_feat_sizes": list(tracker.memory_attention_rope_feat_sizes),
    }
    return {k: [before[k], after[k]] for k in before if before[k] != after[k]}


def apply_v2_settings(config: Sam3VideoConfig) -> dict[str, list[Any]]:
    """Set :data:`V2_VIDEO_SETTINGS` on ``config`` in place; returns name -> ``[old, new]`` of changes."""
    changed = {}
    for key, value in V2_VIDEO_SETTINGS.items():
        old = getattr(config, key)
        if old != value:
            changed[key] = [old, value]
        setattr(config, key, value)
    return changed
