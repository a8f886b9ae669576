"""SAM3 configurations built in code: the full-size architecture and small ones for tests and CPUs.

All return ``transformers.Sam3Config`` objects; nested configs carry their ``model_type`` keys so that
``save_pretrained`` / ``from_pretrained`` round-trip them.
"""

from __future__ import annotations

from typing import Any

from transformers import Sam3Config


def full_sam3_config() -> Sam3Config:
    """The released SAM3 image model (1008 px, ViT-L-like 32 x 1024, 200 queries)."""
    return Sam3Config()


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
        return {"hidden_size": det, "num_layers": n, "num_attention_heads": detector_heads,
                "intermediate_size": 4 * det, **kw}

    return Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config={"model_type": "sam3_geometry_encoder", **block(detector_layers)},
        detr_encoder_config={"model_type": "sam3_detr_encoder", **block(detector_layers)},
        detr_decoder_config={"model_type": "sam3_detr_decoder", **block(detector_layers), "num_queries": num_queries},
        mask_decoder_config={"model_type": "sam3_mask_decoder", "hidden_size": det,
                             "num_attention_heads": detector_heads},
        **overrides,
    )


def tiny_sam3_config(**overrides: Any) -> Sam3Config:
    """The smallest configuration the tests use: 224 px, widths 64/128, one layer each, 8 queries."""
    return small_sam3_config(**overrides)
