"""Test helper: write a transformers SAM3 state dict back in Meta's checkpoint layout.

This is the inverse of ``medsam3.model.convert`` written independently of ``medsam3.model.meta_keys``, one
component at a time, from Meta's key names (``tests/model_meta_sam3_keys.tsv``, the state dict of Meta's
``sam3`` package). It fuses q/k/v into ``qkv`` / ``in_proj``, puts back the ViT position embedding's CLS
row, stores CLIP's ``text_projection`` transposed, splits the tracker's point-embedding table, and adds
the Meta-only tensors (rotary tables ``freqs_cis``, the geometry encoder's unused point projections).
Every transformers key must be consumed, so a key this helper does not know makes the test fail.
"""

from __future__ import annotations

from pathlib import Path

import torch

LISTING = Path(__file__).with_name("model_meta_sam3_keys.tsv")


def read_meta_listing() -> dict[str, tuple[tuple[int, ...], str]]:
    """Meta's real state-dict keys -> (shape, dtype name), from the stored listing."""
    out = {}
    for line in LISTING.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


class _Writer:
    def __init__(self, hf: dict[str, torch.Tensor], seed: int):
        self.src = dict(hf)
        self.dst: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def take(self, meta: str, hf: str) -> None:
        """Move ``hf`` (+ ``.weight`` / ``.bias`` when those exist) to ``meta``."""
        if hf in self.src:
            self.dst[meta] = self.src.pop(hf)
            return
        found = False
        for suffix in (".weight", ".bias"):
            if hf + suffix in self.src:
                self.dst[meta + suffix] = self.src.pop(hf + suffix)
                found = True
        assert found, f"no transformers weight {hf} for Meta's {meta}"

    def fuse(self, meta_weight: str, meta_bias: str, hf: str) -> None:
        """q_proj, k_proj, v_proj of ``hf`` -> one fused weight and bias (rows q, then k, then v)."""
        for meta, suffix in ((meta_weight, "weight"), (meta_bias, "bias")):
            self.dst[meta] = torch.cat([self.src.pop(f"{hf}.{p}_proj.{suffix}") for p in "qkv"], dim=0)

    def random(self, meta: str, shape: tuple[int, ...], like: torch.Tensor, dtype=torch.float32) -> None:
        value = torch.randn(shape, generator=self.gen, dtype=dtype)
        self.dst[meta] = value.to(like.device)

    def count(self, prefix: str) -> int:
        n = 0
        while any(k.startswith(f"{prefix}{n}.") for k in self.src):
            n += 1
        return n


def _neck(w: _Writer, meta: str, hf: str, scales: list[float]) -> None:
    for j, s in enumerate(scales):
        if s == 4.0:
            w.take(f"{meta}.{j}.dconv_2x2_0", f"{hf}.{j}.scale_layers.0")
            w.take(f"{meta}.{j}.dconv_2x2_1", f"{hf}.{j}.scale_layers.2")
        elif s == 2.0:
            w.take(f"{meta}.{j}.dconv_2x2", f"{hf}.{j}.scale_layers.0")
        w.take(f"{meta}.{j}.conv_1x1", f"{hf}.{j}.proj1")
        w.take(f"{meta}.{j}.conv_3x3", f"{hf}.{j}.proj2")


def _detector(w: _Writer, config, p: str) -> None:
    m = "detector."
    vit = config.vision_config.backbone_config
    trunk, hv = m + "backbone.vision_backbone.trunk.", p + "vision_encoder.backbone."
    pos = w.src.pop(hv + "embeddings.position_embeddings")
    cls_row = torch.randn((1, 1, pos.shape[2]), generator=w.gen).to(pos.device)
    w.dst[trunk + "pos_embed"] = torch.cat([cls_row, pos], dim=1)
    w.take(trunk + "patch_embed.proj", hv + "embeddings.patch_embeddings.projection")
    w.take(trunk + "ln_pre", hv + "layer_norm")
    grid = vit.image_size // vit.patch_size
    head_dim = vit.hidden_size // vit.num_attention_heads
    for i in range(vit.num_hidden_layers):
        b, h = f"{trunk}blocks.{i}.", f"{hv}layers.{i}."
        w.take(b + "norm1", h + "layer_norm1")
        w.take(b + "norm2", h + "layer_norm2")
        w.fuse(b + "attn.qkv.weight", b + "attn.qkv.bias", h + "attention")
        w.take(b + "attn.proj", h + "attention.o_proj")
        w.take(b + "mlp.fc1", h + "mlp.fc1")
        w.take(b + "mlp.fc2", h + "mlp.fc2")
        side = grid if i in vit.global_attn_indexes else vit.window_size
        w.random(b + "attn.freqs_cis", (side * side, head_dim // 2), pos, torch.complex64)
    scales = list(config.vision_config.scale_factors)
    _neck(w, m + "backbone.vision_backbone.convs", p + "vision_encoder.neck.fpn_layers", scales)

    enc, ht = m + "backbone.language_backbone.encoder.", p + "text_encoder."
    w.take(enc + "token_embedding", ht + "text_model.embeddings.token_embedding")
    w.take(enc + "positional_embedding", ht + "text_model.embeddings.position_embedding.weight")
    w.take(enc + "ln_final", ht + "text_model.final_layer_norm")
    w.dst[enc + "text_projection"] = w.src.pop(ht + "text_projection.weight").T.contiguous()
    for i in range(config.text_config.num_hidden_layers):
        b, h = f"{enc}transformer.resblocks.{i}.", f"{ht}text_model.encoder.layers.{i}."
        w.fuse(b + "attn.in_proj_weight", b + "attn.in_proj_bias", h + "self_attn")
        w.take(b + "attn.out_proj", h + "self_attn.out_proj")
        w.take(b + "ln_1", h + "layer_norm1")
        w.take(b + "ln_2", h + "layer_norm2")
        w.take(b + "mlp.c_fc", h + "mlp.fc1")
        w.take(b + "mlp.c_proj", h + "mlp.fc2")
    w.take(m + "backbone.language_backbone.resizer", p + "text_projection")

    g, hg = m + "geometry_encoder.", p + "geometry_encoder."
    d = config.geometry_encoder_config.hidden_size
    for i in range(config.geometry_encoder_config.num_layers):
        b, h = f"{g}encode.{i}.", f"{hg}layers.{i}."
        w.fuse(b + "self_attn.in_proj_weight", b + "self_attn.in_proj_bias", h + "self_attn")
        w.take(b + "self_attn.out_proj", h + "self_attn.o_proj")
        w.fuse(b + "cross_attn_image.in_proj_weight", b + "cross_attn_image.in_proj_bias", h + "cross_attn")
        w.take(b + "cross_attn_image.out_proj", h + "cross_attn.o_proj")
        w.take(b + "linear1", h + "mlp.fc1")
        w.take(b + "linear2", h + "mlp.fc2")
        for n in (1, 2, 3):
            w.take(f"{b}norm{n}", f"{h}layer_norm{n}")
    w.take(g + "img_pre_norm", hg + "vision_layer_norm")
    w.take(g + "norm", hg + "prompt_layer_norm")
    w.take(g + "encode_norm", hg + "output_layer_norm")
    for name in (
        "boxes_direct_project",
        "boxes_pool_project",
        "boxes_pos_enc_project",
        "final_proj",
        "cls_embed",
        "label_embed",
    ):
        w.take(g + name, hg + name)
    ref = w.dst[g + "final_proj.weight"]
    for name, shape in (
        ("points_direct_project", (d, 2)),
        ("points_pool_project", (d, d)),
        ("points_pos_enc_project", (d, d)),
    ):
        w.random(f"{g}{name}.weight", shape, ref)
        w.random(f"{g}{name}.bias", (d,), ref)

    for i in range(config.detr_encoder_config.num_layers):
        b, h = f"{m}transformer.encoder.layers.{i}.", f"{p}detr_encoder.layers.{i}."
        w.fuse(b + "self_attn.in_proj_weight", b + "self_attn.in_proj_bias", h + "self_attn")
        w.take(b + "self_attn.out_proj", h + "self_attn.o_proj")
        w.fuse(b + "cross_attn_image.in_proj_weight", b + "cross_attn_image.in_proj_bias", h + "cross_attn")
        w.take(b + "cross_attn_image.out_proj", h + "cross_attn.o_proj")
        w.take(b + "linear1", h + "mlp.fc1")
        w.take(b + "linear2", h + "mlp.fc2")
        for n in (1, 2, 3):
            w.take(f"{b}norm{n}", f"{h}layer_norm{n}")

    dec, hd = m + "transformer.decoder.", p + "detr_decoder."
    for name in ("query_embed", "reference_points", "presence_token"):
        w.take(dec + name, hd + name)
    w.take(dec + "presence_token_out_norm", hd + "presence_layer_norm")
    w.take(dec + "norm", hd + "output_layer_norm")
    for meta_name, hf_name in (
        ("presence_token_head", "presence_head"),
        ("bbox_embed", "box_head"),
        ("ref_point_head", "ref_point_head"),
        ("boxRPB_embed_x", "box_rpb_embed_x"),
        ("boxRPB_embed_y", "box_rpb_embed_y"),
    ):
        k = 0
        while f"{hd}{hf_name}.layer{k + 1}.weight" in w.src:
            w.take(f"{dec}{meta_name}.layers.{k}", f"{hd}{hf_name}.layer{k + 1}")
            k += 1
        assert k >= 2, hf_name
    for i in range(config.detr_decoder_config.num_layers):
        b, h = f"{dec}layers.{i}.", f"{hd}layers.{i}."
        for meta_name, hf_name in (
            ("self_attn", "self_attn"),
            ("ca_text", "text_cross_attn"),
            ("cross_attn", "vision_cross_attn"),
        ):
            w.fuse(f"{b}{meta_name}.in_proj_weight", f"{b}{meta_name}.in_proj_bias", h + hf_name)
            w.take(f"{b}{meta_name}.out_proj", f"{h}{hf_name}.o_proj")
        w.take(b + "linear1", h + "mlp.fc1")
        w.take(b + "linear2", h + "mlp.fc2")
        w.take(b + "norm1", h + "vision_cross_attn_layer_norm")
        w.take(b + "catext_norm", h + "text_cross_attn_layer_norm")
        w.take(b + "norm2", h + "self_attn_layer_norm")
        w.take(b + "norm3", h + "mlp_layer_norm")

    dot, hs = m + "dot_prod_scoring.", p + "dot_product_scoring."
    w.take(dot + "prompt_mlp.layers.0", hs + "text_mlp.layer1")
    w.take(dot + "prompt_mlp.layers.1", hs + "text_mlp.layer2")
    w.take(dot + "prompt_mlp.out_norm", hs + "text_mlp_out_norm")
    w.take(dot + "prompt_proj", hs + "text_proj")
    w.take(dot + "hs_proj", hs + "query_proj")

    seg, hm = m + "segmentation_head.", p + "mask_decoder."
    for k in range(w.count(hm + "pixel_decoder.conv_layers.")):
        w.take(f"{seg}pixel_decoder.conv_layers.{k}", f"{hm}pixel_decoder.conv_layers.{k}")
        w.take(f"{seg}pixel_decoder.norms.{k}", f"{hm}pixel_decoder.norms.{k}")
    for k in range(w.count(hm + "mask_embedder.layers.")):
        w.take(f"{seg}mask_predictor.mask_embed.layers.{k}", f"{hm}mask_embedder.layers.{k}")
    w.take(seg + "instance_seg_head", hm + "instance_projection")
    w.take(seg + "semantic_seg_head", hm + "semantic_projection")
    w.fuse(
        seg + "cross_attend_prompt.in_proj_weight",
        seg + "cross_attend_prompt.in_proj_bias",
        hm + "prompt_cross_attn",
    )
    w.take(seg + "cross_attend_prompt.out_proj", hm + "prompt_cross_attn.o_proj")
    w.take(seg + "cross_attn_norm", hm + "prompt_cross_attn_norm")


def _sam_mlp(w: _Writer, meta: str, hf: str) -> None:
    """SAM MLP: proj_in, layers.0.., proj_out -> Meta layers.0, 1, ..., n-1."""
    hidden = w.count(hf + ".layers.")
    w.take(f"{meta}.layers.0", hf + ".proj_in")
    for k in range(hidden):
        w.take(f"{meta}.layers.{k + 1}", f"{hf}.layers.{k}")
    w.take(f"{meta}.layers.{hidden + 1}", hf + ".proj_out")


def _tracker(w: _Writer, config) -> None:
    t, h = "tracker.", "tracker_model."
    pe, hp = t + "sam_prompt_encoder.", h + "prompt_encoder."
    table = w.src.pop(hp + "point_embed.weight")
    for k in range(table.shape[0]):
        w.dst[f"{pe}point_embeddings.{k}.weight"] = table[k : k + 1].clone()
    gauss = w.src.pop(hp + "shared_embedding.positional_embedding")
    other = w.src.pop(h + "shared_image_embedding.positional_embedding")
    if gauss.device.type != "meta":
        assert torch.equal(gauss, other), "the two copies of the Fourier matrix differ"
    w.dst[pe + "pe_layer.positional_encoding_gaussian_matrix"] = gauss
    w.take(pe + "no_mask_embed", hp + "no_mask_embed")
    w.take(pe + "not_a_point_embed", hp + "not_a_point_embed")
    for i, name in ((0, "conv1"), (1, "layer_norm1"), (3, "conv2"), (4, "layer_norm2"), (6, "conv3")):
        w.take(f"{pe}mask_downscaling.{i}", f"{hp}mask_embed.{name}")

    md, hm = t + "sam_mask_decoder.", h + "mask_decoder."
    for name in ("iou_token", "mask_tokens", "obj_score_token", "conv_s0", "conv_s1"):
        w.take(md + name, hm + name)
    w.take(md + "output_upscaling.0", hm + "upscale_conv1")
    w.take(md + "output_upscaling.1", hm + "upscale_layer_norm")
    w.take(md + "output_upscaling.3", hm + "upscale_conv2")
    _sam_mlp(w, md + "iou_prediction_head", hm + "iou_prediction_head")
    _sam_mlp(w, md + "pred_obj_score_head", hm + "pred_obj_score_head")
    for k in range(w.count(hm + "output_hypernetworks_mlps.")):
        _sam_mlp(w, f"{md}output_hypernetworks_mlps.{k}", f"{hm}output_hypernetworks_mlps.{k}")
    for i in range(config.tracker_config.mask_decoder_config.num_hidden_layers):
        b, hh = f"{md}transformer.layers.{i}.", f"{hm}transformer.layers.{i}."
        for att in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            for proj in ("q_proj", "k_proj", "v_proj"):
                w.take(f"{b}{att}.{proj}", f"{hh}{att}.{proj}")
            w.take(f"{b}{att}.out_proj", f"{hh}{att}.o_proj")
        w.take(b + "mlp.lin1", hh + "mlp.proj_in")
        w.take(b + "mlp.lin2", hh + "mlp.proj_out")
        for n in (1, 2, 3, 4):
            w.take(f"{b}norm{n}", f"{hh}layer_norm{n}")
    for proj in ("q_proj", "k_proj", "v_proj"):
        w.take(
            f"{md}transformer.final_attn_token_to_image.{proj}",
            f"{hm}transformer.final_attn_token_to_image.{proj}",
        )
    w.take(
        md + "transformer.final_attn_token_to_image.out_proj",
        hm + "transformer.final_attn_token_to_image.o_proj",
    )
    w.take(md + "transformer.norm_final_attn", hm + "transformer.layer_norm_final_attn")

    for i in range(config.tracker_config.memory_attention_num_layers):
        b, hh = f"{t}transformer.encoder.layers.{i}.", f"{h}memory_attention.layers.{i}."
        for att in ("self_attn", "cross_attn_image"):
            for proj in ("q_proj", "k_proj", "v_proj"):
                w.take(f"{b}{att}.{proj}", f"{hh}{att}.{proj}")
            w.take(f"{b}{att}.out_proj", f"{hh}{att}.o_proj")
        w.take(b + "linear1", hh + "linear1")
        w.take(b + "linear2", hh + "linear2")
        for n in (1, 2, 3):
            w.take(f"{b}norm{n}", f"{hh}layer_norm{n}")
    w.take(t + "transformer.encoder.norm", h + "memory_attention.layer_norm")

    mb, he = t + "maskmem_backbone.", h + "memory_encoder."
    n_down = w.count(he + "mask_downsampler.layers.")
    for k in range(n_down):
        w.take(f"{mb}mask_downsampler.encoder.{3 * k}", f"{he}mask_downsampler.layers.{k}.conv")
        w.take(f"{mb}mask_downsampler.encoder.{3 * k + 1}", f"{he}mask_downsampler.layers.{k}.layer_norm")
    w.take(f"{mb}mask_downsampler.encoder.{3 * n_down}", he + "mask_downsampler.final_conv")
    w.take(mb + "pix_feat_proj", he + "feature_projection")
    w.take(mb + "out_proj", he + "projection")
    for k in range(w.count(he + "memory_fuser.layers.")):
        b, hh = f"{mb}fuser.layers.{k}.", f"{he}memory_fuser.layers.{k}."
        w.take(b + "dwconv", hh + "depthwise_conv")
        w.take(b + "norm", hh + "layer_norm")
        w.take(b + "pwconv1", hh + "pointwise_conv1")
        w.take(b + "pwconv2", hh + "pointwise_conv2")
        w.take(b + "gamma", hh + "scale")

    for meta_name, hf_name in (
        ("maskmem_tpos_enc", "memory_temporal_positional_encoding"),
        ("no_mem_embed", "no_memory_embedding"),
        ("no_mem_pos_enc", "no_memory_positional_encoding"),
        ("no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
        ("no_obj_ptr", "no_object_pointer"),
    ):
        w.take(t + meta_name, h + hf_name)
    _sam_mlp(w, t + "obj_ptr_proj", h + "object_pointer_proj")
    w.take(t + "obj_ptr_tpos_proj", h + "temporal_positional_encoding_projection_layer")
    w.take(t + "mask_downsample", h + "mask_downsample")


def tie_fourier_copies(model) -> None:
    """Give a random ``Sam3VideoModel`` one Fourier matrix in both places, as Meta's checkpoints have.

    transformers keeps the prompt encoder's random Fourier matrix twice (``shared_image_embedding`` and
    ``prompt_encoder.shared_embedding``); Meta stores it once, so only models where the copies agree can
    round-trip through Meta's layout.
    """
    tracker = model.tracker_model
    with torch.no_grad():
        tracker.shared_image_embedding.positional_embedding.copy_(
            tracker.prompt_encoder.shared_embedding.positional_embedding
        )


def hf_to_meta(hf_state: dict[str, torch.Tensor], config, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``Sam3Model`` / ``Sam3VideoModel`` state dict -> Meta's state dict (``detector.*``, ``tracker.*``).

    ``config`` is the model's ``Sam3Config`` or ``Sam3VideoConfig``. Meta-only tensors get seeded random
    values (they are dropped by the conversion).
    """
    w = _Writer(hf_state, seed)
    video = getattr(config, "model_type", "") == "sam3_video"
    detector = config.detector_config if video else config
    _detector(w, detector, "detector_model." if video else "")
    if video:
        _neck(
            w,
            "detector.backbone.vision_backbone.sam2_convs",
            "tracker_neck.fpn_layers",
            list(detector.vision_config.scale_factors),
        )
        _tracker(w, config)
    assert not w.src, f"transformers keys with no Meta counterpart: {sorted(w.src)[:10]}"
    return w.dst
