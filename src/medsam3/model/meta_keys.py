"""Meta's SAM3 state-dict layout and its mapping onto transformers' SAM3 models.

Meta's checkpoints (``sam3.pt``, Medical SAM3 trainer checkpoints) hold the state dict of Meta's video model:
``detector.*`` (the image model: ViT trunk, FPN necks, CLIP text encoder, geometry encoder, DETR encoder and
decoder, dot-product scoring, segmentation head) and ``tracker.*`` (SAM2-style prompt encoder, mask decoder,
memory attention and memory encoder). transformers names the same weights differently:

* ``Sam3Model`` (image model): the detector keys, without prefix;
* ``Sam3VideoModel``: ``detector_model.*`` (the same ``Sam3Model`` keys), ``tracker_model.*`` (tracker)
  and ``tracker_neck.*`` (the second FPN neck, Meta's ``detector.backbone.vision_backbone.sam2_convs``).

Each Meta key is matched against ordered, anchored rules (first match wins). A rule names the part it
belongs to (``detector``, ``tracker_neck``, ``tracker``), the transformers key relative to that part, and
an operation:

* ``copy``: same tensor;
* ``split3``: a fused ``qkv`` / ``in_proj`` tensor (3·D, ...) split along dim 0 into q, k, v;
* ``drop_cls``: ViT position embedding (1, 1+G², D) without its CLS row -> (1, G², D);
* ``transpose``: CLIP ``text_projection`` stored (width, proj) -> ``Linear.weight`` (proj, width);
* ``stack``: the tracker's point embeddings ``point_embeddings.{i}.weight`` (1, D) -> one (N, D) table;
* ``duplicate``: the prompt encoder's random Fourier matrix, used twice by transformers.

Keys that are deliberately not converted are listed in :data:`DROPPED` with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

DETECTOR, TRACKER_NECK, TRACKER = "detector", "tracker_neck", "tracker"


@dataclass(frozen=True)
class Rule:
    """One Meta key pattern (relative to ``detector.`` / ``tracker.``) and what it becomes."""

    pattern: str
    part: str
    target: Target | tuple[str, ...]
    op: str = "copy"


@dataclass(frozen=True)
class Prescan:
    """Facts about the whole key set some rules need: the depth of numbered MLPs and conv stacks."""

    mlp_depth: dict[str, int]
    downsampler_last: int


#: A transformers key template (``re.Match.expand`` syntax) or a function of the match and the prescan.
Target = str | Callable[[re.Match, Prescan], str]


def _numbered(prefix: str, suffix: str, group: int = 1) -> Callable[[re.Match, Prescan], str]:
    """Meta ``layers.{i}`` -> transformers ``layer{i+1}`` (Sam3's MLPs: layer1, layer2, ...)."""

    def target(m: re.Match, _: Prescan) -> str:
        return f"{prefix}layer{int(m.group(group)) + 1}{m.expand(suffix)}"

    return target


def _sam_mlp(prefix_group: int, index_group: int, out_prefix: str) -> Callable[[re.Match, Prescan], str]:
    """SAM-style MLP: Meta ``layers.0 .. layers.{n-1}`` -> ``proj_in``, ``layers.{0..n-3}``, ``proj_out``."""

    def target(m: re.Match, scan: Prescan) -> str:
        i = int(m.group(index_group))
        depth = scan.mlp_depth[m.group(prefix_group)]
        name = "proj_in" if i == 0 else "proj_out" if i == depth - 1 else f"layers.{i - 1}"
        return m.expand(out_prefix).replace("{layer}", name)

    return target


def _downsampler(m: re.Match, scan: Prescan) -> str:
    """Meta ``mask_downsampler.encoder.{i}``: (conv, norm, activation) triples, then a final 1x1 conv."""
    i = int(m.group(1))
    if i == scan.downsampler_last:
        return f"memory_encoder.mask_downsampler.final_conv.{m.group(2)}"
    kind = {0: "conv", 1: "layer_norm"}[i % 3]
    return f"memory_encoder.mask_downsampler.layers.{i // 3}.{kind}.{m.group(2)}"


_WB = r"(weight|bias)"
_VIT = r"backbone\.vision_backbone\.trunk\."
_TXT = r"backbone\.language_backbone\.encoder\."
_RES = _TXT + r"transformer\.resblocks\.(\d+)\."
_GEO = r"geometry_encoder\."
_ENC = r"transformer\.encoder\.layers\.(\d+)\."
_DEC = r"transformer\.decoder\."
_SEG = r"segmentation_head\."
_NECK_OPS = (
    ("dconv_2x2_0", "scale_layers.0"),
    ("dconv_2x2_1", "scale_layers.2"),  # transformers puts the GELU between the two upsamplings at index 1
    ("dconv_2x2", "scale_layers.0"),
    ("conv_1x1", "proj1"),
    ("conv_3x3", "proj2"),
)
_DEC_ATTN = (("self_attn", "self_attn"), ("ca_text", "text_cross_attn"), ("cross_attn", "vision_cross_attn"))
_DEC_NORMS = (
    ("norm1", "vision_cross_attn_layer_norm"),
    ("catext_norm", "text_cross_attn_layer_norm"),
    ("norm2", "self_attn_layer_norm"),
    ("norm3", "mlp_layer_norm"),
)
_DEC_MLPS = (
    ("presence_token_head", "presence_head"),
    ("bbox_embed", "box_head"),
    ("ref_point_head", "ref_point_head"),
    ("boxRPB_embed_x", "box_rpb_embed_x"),
    ("boxRPB_embed_y", "box_rpb_embed_y"),
)


def _d(pattern: str, target: Target, op: str = "copy") -> Rule:
    return Rule(pattern, DETECTOR, target, op)


def _t(pattern: str, target: Target | tuple[str, ...], op: str = "copy") -> Rule:
    return Rule(pattern, TRACKER, target, op)


DETECTOR_RULES: tuple[Rule, ...] = (
    # ViT trunk
    _d(_VIT + r"pos_embed", "vision_encoder.backbone.embeddings.position_embeddings", "drop_cls"),
    _d(
        _VIT + r"patch_embed\.proj\." + _WB,
        r"vision_encoder.backbone.embeddings.patch_embeddings.projection.\1",
    ),
    _d(_VIT + r"ln_pre\." + _WB, r"vision_encoder.backbone.layer_norm.\1"),
    _d(_VIT + r"blocks\.(\d+)\.norm([12])\." + _WB, r"vision_encoder.backbone.layers.\1.layer_norm\2.\3"),
    _d(
        _VIT + r"blocks\.(\d+)\.attn\.qkv\." + _WB,
        r"vision_encoder.backbone.layers.\1.attention.{q,k,v}_proj.\2",
        "split3",
    ),
    _d(_VIT + r"blocks\.(\d+)\.attn\.proj\." + _WB, r"vision_encoder.backbone.layers.\1.attention.o_proj.\2"),
    _d(_VIT + r"blocks\.(\d+)\.mlp\.(fc[12])\." + _WB, r"vision_encoder.backbone.layers.\1.mlp.\2.\3"),
    # FPN necks: the detector's, and the tracker's (``sam2_convs``)
    *(
        _d(
            r"backbone\.vision_backbone\.convs\.(\d+)\." + meta + r"\." + _WB,
            rf"vision_encoder.neck.fpn_layers.\1.{hf}.\2",
        )
        for meta, hf in _NECK_OPS
    ),
    *(
        Rule(
            r"backbone\.vision_backbone\.sam2_convs\.(\d+)\." + meta + r"\." + _WB,
            TRACKER_NECK,
            rf"fpn_layers.\1.{hf}.\2",
        )
        for meta, hf in _NECK_OPS
    ),
    # CLIP text encoder and the projection to the detector width
    _d(_TXT + r"token_embedding\.weight", "text_encoder.text_model.embeddings.token_embedding.weight"),
    _d(_TXT + r"positional_embedding", "text_encoder.text_model.embeddings.position_embedding.weight"),
    _d(_TXT + r"ln_final\." + _WB, r"text_encoder.text_model.final_layer_norm.\1"),
    _d(_TXT + r"text_projection", "text_encoder.text_projection.weight", "transpose"),
    _d(
        _RES + r"attn\.in_proj_" + _WB,
        r"text_encoder.text_model.encoder.layers.\1.self_attn.{q,k,v}_proj.\2",
        "split3",
    ),
    _d(_RES + r"attn\.out_proj\." + _WB, r"text_encoder.text_model.encoder.layers.\1.self_attn.out_proj.\2"),
    _d(_RES + r"ln_([12])\." + _WB, r"text_encoder.text_model.encoder.layers.\1.layer_norm\2.\3"),
    _d(_RES + r"mlp\.c_fc\." + _WB, r"text_encoder.text_model.encoder.layers.\1.mlp.fc1.\2"),
    _d(_RES + r"mlp\.c_proj\." + _WB, r"text_encoder.text_model.encoder.layers.\1.mlp.fc2.\2"),
    _d(r"backbone\.language_backbone\.resizer\." + _WB, r"text_projection.\1"),
    # Geometry encoder (box prompts)
    _d(
        _GEO + r"encode\.(\d+)\.self_attn\.in_proj_" + _WB,
        r"geometry_encoder.layers.\1.self_attn.{q,k,v}_proj.\2",
        "split3",
    ),
    _d(
        _GEO + r"encode\.(\d+)\.self_attn\.out_proj\." + _WB,
        r"geometry_encoder.layers.\1.self_attn.o_proj.\2",
    ),
    _d(
        _GEO + r"encode\.(\d+)\.cross_attn_image\.in_proj_" + _WB,
        r"geometry_encoder.layers.\1.cross_attn.{q,k,v}_proj.\2",
        "split3",
    ),
    _d(
        _GEO + r"encode\.(\d+)\.cross_attn_image\.out_proj\." + _WB,
        r"geometry_encoder.layers.\1.cross_attn.o_proj.\2",
    ),
    _d(_GEO + r"encode\.(\d+)\.linear([12])\." + _WB, r"geometry_encoder.layers.\1.mlp.fc\2.\3"),
    _d(_GEO + r"encode\.(\d+)\.norm([123])\." + _WB, r"geometry_encoder.layers.\1.layer_norm\2.\3"),
    _d(_GEO + r"img_pre_norm\." + _WB, r"geometry_encoder.vision_layer_norm.\1"),
    _d(_GEO + r"norm\." + _WB, r"geometry_encoder.prompt_layer_norm.\1"),
    _d(_GEO + r"encode_norm\." + _WB, r"geometry_encoder.output_layer_norm.\1"),
    _d(
        _GEO + r"(boxes_direct_project|boxes_pool_project|boxes_pos_enc_project|final_proj)\." + _WB,
        r"geometry_encoder.\1.\2",
    ),
    _d(_GEO + r"(cls_embed|label_embed)\.weight", r"geometry_encoder.\1.weight"),
    # DETR encoder (image tokens attend to the prompt)
    _d(_ENC + r"self_attn\.in_proj_" + _WB, r"detr_encoder.layers.\1.self_attn.{q,k,v}_proj.\2", "split3"),
    _d(_ENC + r"self_attn\.out_proj\." + _WB, r"detr_encoder.layers.\1.self_attn.o_proj.\2"),
    _d(
        _ENC + r"cross_attn_image\.in_proj_" + _WB,
        r"detr_encoder.layers.\1.cross_attn.{q,k,v}_proj.\2",
        "split3",
    ),
    _d(_ENC + r"cross_attn_image\.out_proj\." + _WB, r"detr_encoder.layers.\1.cross_attn.o_proj.\2"),
    _d(_ENC + r"linear([12])\." + _WB, r"detr_encoder.layers.\1.mlp.fc\2.\3"),
    _d(_ENC + r"norm([123])\." + _WB, r"detr_encoder.layers.\1.layer_norm\2.\3"),
    # DETR decoder (queries, presence token, box refinement)
    _d(_DEC + r"(query_embed|reference_points|presence_token)\.weight", r"detr_decoder.\1.weight"),
    _d(_DEC + r"norm\." + _WB, r"detr_decoder.output_layer_norm.\1"),
    _d(_DEC + r"presence_token_out_norm\." + _WB, r"detr_decoder.presence_layer_norm.\1"),
    *(
        _d(_DEC + meta + r"\.layers\.(\d+)\." + _WB, _numbered(f"detr_decoder.{hf}.", r".\2"))
        for meta, hf in _DEC_MLPS
    ),
    *(
        _d(
            _DEC + r"layers\.(\d+)\." + meta + r"\.in_proj_" + _WB,
            rf"detr_decoder.layers.\1.{hf}.{{q,k,v}}_proj.\2",
            "split3",
        )
        for meta, hf in _DEC_ATTN
    ),
    *(
        _d(
            _DEC + r"layers\.(\d+)\." + meta + r"\.out_proj\." + _WB,
            rf"detr_decoder.layers.\1.{hf}.o_proj.\2",
        )
        for meta, hf in _DEC_ATTN
    ),
    _d(_DEC + r"layers\.(\d+)\.linear([12])\." + _WB, r"detr_decoder.layers.\1.mlp.fc\2.\3"),
    *(
        _d(_DEC + r"layers\.(\d+)\." + meta + r"\." + _WB, rf"detr_decoder.layers.\1.{hf}.\2")
        for meta, hf in _DEC_NORMS
    ),
    # Dot-product scoring of queries against the prompt
    _d(
        r"dot_prod_scoring\.prompt_mlp\.layers\.(\d+)\." + _WB,
        _numbered("dot_product_scoring.text_mlp.", r".\2"),
    ),
    _d(r"dot_prod_scoring\.prompt_mlp\.out_norm\." + _WB, r"dot_product_scoring.text_mlp_out_norm.\1"),
    _d(r"dot_prod_scoring\.prompt_proj\." + _WB, r"dot_product_scoring.text_proj.\1"),
    _d(r"dot_prod_scoring\.hs_proj\." + _WB, r"dot_product_scoring.query_proj.\1"),
    # Segmentation head (pixel decoder, mask embedding, instance / semantic projections)
    _d(_SEG + r"pixel_decoder\.(conv_layers|norms)\.(\d+)\." + _WB, r"mask_decoder.pixel_decoder.\1.\2.\3"),
    _d(
        _SEG + r"(?:mask_predictor\.)?mask_embed\.layers\.(\d+)\." + _WB,
        r"mask_decoder.mask_embedder.layers.\1.\2",
    ),
    _d(_SEG + r"instance_seg_head\." + _WB, r"mask_decoder.instance_projection.\1"),
    _d(_SEG + r"semantic_seg_head\." + _WB, r"mask_decoder.semantic_projection.\1"),
    _d(
        _SEG + r"cross_attend_prompt\.in_proj_" + _WB,
        r"mask_decoder.prompt_cross_attn.{q,k,v}_proj.\1",
        "split3",
    ),
    _d(_SEG + r"cross_attend_prompt\.out_proj\." + _WB, r"mask_decoder.prompt_cross_attn.o_proj.\1"),
    _d(_SEG + r"cross_attn_norm\." + _WB, r"mask_decoder.prompt_cross_attn_norm.\1"),
)

_PE = r"sam_prompt_encoder\."
_MD = r"sam_mask_decoder\."
_TW = _MD + r"transformer\.layers\.(\d+)\."
_ATT = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_FIN = _MD + r"transformer\.final_attn_token_to_image\."
_MEM = r"transformer\.encoder\.layers\.(\d+)\."
_FUSER = (
    ("dwconv", "depthwise_conv"),
    ("norm", "layer_norm"),
    ("pwconv1", "pointwise_conv1"),
    ("pwconv2", "pointwise_conv2"),
)

TRACKER_RULES: tuple[Rule, ...] = (
    # Prompt encoder
    _t(_PE + r"point_embeddings\.(\d+)\.weight", "prompt_encoder.point_embed.weight", "stack"),
    _t(
        _PE + r"pe_layer\.positional_encoding_gaussian_matrix",
        (
            "prompt_encoder.shared_embedding.positional_embedding",
            "shared_image_embedding.positional_embedding",
        ),
        "duplicate",
    ),
    _t(_PE + r"(no_mask_embed|not_a_point_embed)\.weight", r"prompt_encoder.\1.weight"),
    *(
        _t(_PE + rf"mask_downscaling\.{i}\." + _WB, rf"prompt_encoder.mask_embed.{hf}.\1")
        for i, hf in ((0, "conv1"), (1, "layer_norm1"), (3, "conv2"), (4, "layer_norm2"), (6, "conv3"))
    ),
    # SAM mask decoder
    _t(_MD + r"(iou_token|mask_tokens|obj_score_token)\.weight", r"mask_decoder.\1.weight"),
    _t(_MD + r"(conv_s0|conv_s1)\." + _WB, r"mask_decoder.\1.\2"),
    *(
        _t(_MD + rf"output_upscaling\.{i}\." + _WB, rf"mask_decoder.{hf}.\1")
        for i, hf in ((0, "upscale_conv1"), (1, "upscale_layer_norm"), (3, "upscale_conv2"))
    ),
    _t(
        _MD + r"(iou_prediction_head|pred_obj_score_head|output_hypernetworks_mlps\.\d+)"
        r"\.layers\.(\d+)\." + _WB,
        _sam_mlp(1, 2, r"mask_decoder.\1.{layer}.\3"),
    ),
    _t(_TW + _ATT + r"\.([qkv]_proj)\." + _WB, r"mask_decoder.transformer.layers.\1.\2.\3.\4"),
    _t(_TW + _ATT + r"\.out_proj\." + _WB, r"mask_decoder.transformer.layers.\1.\2.o_proj.\3"),
    _t(_TW + r"mlp\.lin1\." + _WB, r"mask_decoder.transformer.layers.\1.mlp.proj_in.\2"),
    _t(_TW + r"mlp\.lin2\." + _WB, r"mask_decoder.transformer.layers.\1.mlp.proj_out.\2"),
    _t(_TW + r"norm([1-4])\." + _WB, r"mask_decoder.transformer.layers.\1.layer_norm\2.\3"),
    _t(_FIN + r"([qkv]_proj)\." + _WB, r"mask_decoder.transformer.final_attn_token_to_image.\1.\2"),
    _t(_FIN + r"out_proj\." + _WB, r"mask_decoder.transformer.final_attn_token_to_image.o_proj.\1"),
    _t(_MD + r"transformer\.norm_final_attn\." + _WB, r"mask_decoder.transformer.layer_norm_final_attn.\1"),
    # Memory attention (current frame attends to the memory bank)
    _t(_MEM + r"(self_attn|cross_attn_image)\.([qkv]_proj)\." + _WB, r"memory_attention.layers.\1.\2.\3.\4"),
    _t(_MEM + r"(self_attn|cross_attn_image)\.out_proj\." + _WB, r"memory_attention.layers.\1.\2.o_proj.\3"),
    _t(_MEM + r"(linear[12])\." + _WB, r"memory_attention.layers.\1.\2.\3"),
    _t(_MEM + r"norm([123])\." + _WB, r"memory_attention.layers.\1.layer_norm\2.\3"),
    _t(r"transformer\.encoder\.norm\." + _WB, r"memory_attention.layer_norm.\1"),
    # Memory encoder (mask downsampler, pixel projection, fuser)
    _t(r"maskmem_backbone\.mask_downsampler\.encoder\.(\d+)\." + _WB, _downsampler),
    _t(r"maskmem_backbone\.pix_feat_proj\." + _WB, r"memory_encoder.feature_projection.\1"),
    _t(r"maskmem_backbone\.out_proj\." + _WB, r"memory_encoder.projection.\1"),
    *(
        _t(
            r"maskmem_backbone\.fuser\.layers\.(\d+)\." + meta + r"\." + _WB,
            rf"memory_encoder.memory_fuser.layers.\1.{hf}.\2",
        )
        for meta, hf in _FUSER
    ),
    _t(r"maskmem_backbone\.fuser\.layers\.(\d+)\.gamma", r"memory_encoder.memory_fuser.layers.\1.scale"),
    # Memory / object-pointer embeddings
    _t(r"maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    _t(r"no_mem_embed", "no_memory_embedding"),
    _t(r"no_mem_pos_enc", "no_memory_positional_encoding"),
    _t(r"no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    _t(r"no_obj_ptr", "no_object_pointer"),
    _t(r"(obj_ptr_proj)\.layers\.(\d+)\." + _WB, _sam_mlp(1, 2, r"object_pointer_proj.{layer}.\3")),
    _t(r"obj_ptr_tpos_proj\." + _WB, r"temporal_positional_encoding_projection_layer.\1"),
    _t(r"mask_downsample\." + _WB, r"mask_downsample.\1"),
)

#: Meta keys never converted, with the reason (pattern on the full key, prefix included).
DROPPED: tuple[tuple[str, str], ...] = (
    (
        r"detector\.backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis",
        "precomputed rotary-position table of the ViT; transformers recomputes it from the configuration",
    ),
    (
        r"detector\.geometry_encoder\.points_(direct_project|pool_project|pos_enc_project)\.(weight|bias)",
        "point projections of the detector's geometry encoder; transformers' Sam3Model takes no point "
        "prompts (points go to the tracker)",
    ),
)
#: Reason given for tracker keys (and the tracker neck) when only the image model is written.
TRACKER_DROP_REASON = "tracker weights; this conversion writes the image model only (Sam3Model)"

_COMPILED: dict[str, re.Pattern] = {}


def _compile(pattern: str) -> re.Pattern:
    if pattern not in _COMPILED:
        _COMPILED[pattern] = re.compile(pattern)
    return _COMPILED[pattern]


def prescan(tracker_keys: Iterable[str]) -> Prescan:
    """Depths of the tracker's numbered MLPs and the index of the mask downsampler's final conv."""
    depth: dict[str, int] = {}
    last = -1
    mlp = _compile(
        r"(?:sam_mask_decoder\.)?(iou_prediction_head|pred_obj_score_head"
        r"|output_hypernetworks_mlps\.\d+|obj_ptr_proj)\.layers\.(\d+)\."
    )
    down = _compile(r"maskmem_backbone\.mask_downsampler\.encoder\.(\d+)\.")
    for key in tracker_keys:
        if m := mlp.match(key):
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
        if m := down.match(key):
            last = max(last, int(m.group(1)))
    return Prescan(depth, last)


@dataclass(frozen=True)
class KeyPlan:
    """Where one Meta key goes: the part, the transformers keys (relative to the part) and the operation."""

    part: str
    targets: tuple[str, ...]
    op: str


def plan_key(meta_key: str, scan: Prescan) -> KeyPlan | None:
    """The conversion of one full Meta key (``detector.*`` / ``tracker.*``); None when no rule knows it."""
    if meta_key.startswith("detector."):
        rel, rules = meta_key[len("detector.") :], DETECTOR_RULES
    elif meta_key.startswith("tracker."):
        rel, rules = meta_key[len("tracker.") :], TRACKER_RULES
    else:
        return None
    for rule in rules:
        m = _compile(rule.pattern).fullmatch(rel)
        if m is None:
            continue
        target = rule.target
        if callable(target):
            targets: tuple[str, ...] = (target(m, scan),)
        elif isinstance(target, tuple):
            targets = target
        else:
            targets = (m.expand(target),)
        if rule.op == "split3":
            targets = tuple(targets[0].replace("{q,k,v}", p) for p in "qkv")
        return KeyPlan(rule.part, targets, rule.op)
    return None


def dropped_reason(meta_key: str) -> str | None:
    """The reason a Meta key is deliberately left out, or None."""
    for pattern, reason in DROPPED:
        if _compile(pattern).fullmatch(meta_key):
            return reason
    return None


def apply_op(op: str, tensor: torch.Tensor, meta_key: str) -> tuple[torch.Tensor, ...]:
    """Turn one Meta tensor into the transformers tensor(s) of its plan (``stack`` is done by the caller)."""
    if op in ("copy", "stack"):
        return (tensor,)
    if op == "duplicate":
        return (tensor, tensor.clone())
    if op == "transpose":
        if tensor.ndim != 2:
            raise ValueError(f"{meta_key}: expected a 2-D projection, got shape {tuple(tensor.shape)}")
        return (tensor.t().contiguous(),)
    if op == "split3":
        if tensor.shape[0] % 3:
            raise ValueError(f"{meta_key}: fused q/k/v of length {tensor.shape[0]} is not divisible by 3")
        return tuple(t.clone() for t in torch.chunk(tensor, 3, dim=0))
    if op == "drop_cls":
        n = tensor.shape[1]
        side = round((n - 1) ** 0.5)
        if tensor.ndim != 3 or side * side != n - 1:
            raise ValueError(f"{meta_key}: expected (1, 1+G*G, D) with a CLS row, got {tuple(tensor.shape)}")
        return (tensor[:, 1:, :].contiguous(),)
    raise ValueError(f"unknown conversion operation {op!r}")
