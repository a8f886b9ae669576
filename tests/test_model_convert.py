"""Conversion of Meta-format SAM3 checkpoints (``sam3.pt``, trainer checkpoints) into transformers folders.

Three levels: hand-written single keys and tensor operations; the full-size key layout of Meta's model
(``model_meta_sam3_keys.tsv``, tensors on the meta device, no memory); tiny random models written in
Meta's layout by ``model_meta_layout.hf_to_meta`` (an independent inverse), converted with the CLI and
loaded back with transformers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from medsam3.cli import main
from medsam3.model import meta_keys
from medsam3.model.convert import convert_meta_state_dict
from model_meta_layout import hf_to_meta, read_meta_listing, tie_fourier_copies

DTYPES = {"float32": torch.float32, "complex64": torch.complex64}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same_architecture(a, b) -> dict:
    """Configuration fields that differ, ignoring bookkeeping (dtype, architectures, name)."""
    skip = ("dtype", "architectures", "_name_or_path", "transformers_version")
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return {
        k: (fa.get(k), fb.get(k))
        for k in set(fa) | set(fb)
        if fa.get(k) != fb.get(k) and k.rsplit(".", 1)[-1] not in skip
    }


# --------------------------------------------------------------------------------------------------
# hand-written keys and operations


@pytest.mark.parametrize(
    "meta, part, hf, op",
    [
        (
            "detector.backbone.vision_backbone.trunk.blocks.5.attn.qkv.weight",
            "detector",
            (
                "vision_encoder.backbone.layers.5.attention.q_proj.weight",
                "vision_encoder.backbone.layers.5.attention.k_proj.weight",
                "vision_encoder.backbone.layers.5.attention.v_proj.weight",
            ),
            "split3",
        ),
        (
            "detector.backbone.vision_backbone.convs.0.dconv_2x2_1.bias",
            "detector",
            ("vision_encoder.neck.fpn_layers.0.scale_layers.2.bias",),
            "copy",
        ),
        (
            "detector.backbone.vision_backbone.sam2_convs.1.dconv_2x2.weight",
            "tracker_neck",
            ("fpn_layers.1.scale_layers.0.weight",),
            "copy",
        ),
        (
            "detector.backbone.language_backbone.encoder.text_projection",
            "detector",
            ("text_encoder.text_projection.weight",),
            "transpose",
        ),
        (
            "detector.transformer.decoder.layers.3.norm1.weight",
            "detector",
            ("detr_decoder.layers.3.vision_cross_attn_layer_norm.weight",),
            "copy",
        ),
        (
            "detector.transformer.decoder.layers.3.catext_norm.bias",
            "detector",
            ("detr_decoder.layers.3.text_cross_attn_layer_norm.bias",),
            "copy",
        ),
        (
            "detector.transformer.decoder.bbox_embed.layers.2.weight",
            "detector",
            ("detr_decoder.box_head.layer3.weight",),
            "copy",
        ),
        (
            "detector.segmentation_head.mask_predictor.mask_embed.layers.1.bias",
            "detector",
            ("mask_decoder.mask_embedder.layers.1.bias",),
            "copy",
        ),
        (
            "tracker.sam_mask_decoder.iou_prediction_head.layers.1.weight",
            "tracker",
            ("mask_decoder.iou_prediction_head.layers.0.weight",),
            "copy",
        ),
        (
            "tracker.sam_mask_decoder.output_hypernetworks_mlps.2.layers.2.bias",
            "tracker",
            ("mask_decoder.output_hypernetworks_mlps.2.proj_out.bias",),
            "copy",
        ),
        (
            "tracker.maskmem_backbone.mask_downsampler.encoder.4.bias",
            "tracker",
            ("memory_encoder.mask_downsampler.layers.1.layer_norm.bias",),
            "copy",
        ),
        (
            "tracker.maskmem_backbone.mask_downsampler.encoder.12.weight",
            "tracker",
            ("memory_encoder.mask_downsampler.final_conv.weight",),
            "copy",
        ),
        (
            "tracker.maskmem_backbone.fuser.layers.1.gamma",
            "tracker",
            ("memory_encoder.memory_fuser.layers.1.scale",),
            "copy",
        ),
        (
            "tracker.transformer.encoder.layers.2.cross_attn_image.out_proj.weight",
            "tracker",
            ("memory_attention.layers.2.cross_attn_image.o_proj.weight",),
            "copy",
        ),
        (
            "tracker.sam_prompt_encoder.point_embeddings.3.weight",
            "tracker",
            ("prompt_encoder.point_embed.weight",),
            "stack",
        ),
    ],
)
def test_single_key_plans(meta, part, hf, op):
    scan = meta_keys.Prescan(
        mlp_depth={"iou_prediction_head": 3, "output_hypernetworks_mlps.2": 3}, downsampler_last=12
    )
    plan = meta_keys.plan_key(meta, scan)
    assert (plan.part, plan.targets, plan.op) == (part, hf, op)


def test_dropped_and_unknown_keys():
    rope = "detector.backbone.vision_backbone.trunk.blocks.7.attn.freqs_cis"
    assert "rotary" in meta_keys.dropped_reason(rope)
    assert "point" in meta_keys.dropped_reason("detector.geometry_encoder.points_pool_project.bias")
    scan = meta_keys.Prescan({}, -1)
    assert meta_keys.plan_key("detector.backbone.vision_backbone.trunk.blocks.0.attn.lora_A", scan) is None
    assert meta_keys.plan_key("optimizer.state", scan) is None


def test_tensor_operations_by_hand():
    fused = torch.arange(12.0).reshape(6, 2)
    q, k, v = meta_keys.apply_op("split3", fused, "x")
    assert q.tolist() == [[0, 1], [2, 3]] and k.tolist() == [[4, 5], [6, 7]]
    assert v.tolist() == [[8, 9], [10, 11]]
    pos = torch.arange(10.0).reshape(1, 5, 2)  # CLS row + a 2 x 2 grid
    (no_cls,) = meta_keys.apply_op("drop_cls", pos, "x")
    assert no_cls.tolist() == [[[2, 3], [4, 5], [6, 7], [8, 9]]]
    (t,) = meta_keys.apply_op("transpose", torch.tensor([[1.0, 2.0, 3.0]]), "x")
    assert t.tolist() == [[1.0], [2.0], [3.0]]
    with pytest.raises(ValueError, match="CLS"):
        meta_keys.apply_op("drop_cls", torch.zeros(1, 4, 2), "x")
    with pytest.raises(ValueError, match="divisible by 3"):
        meta_keys.apply_op("split3", torch.zeros(4, 2), "x")


# --------------------------------------------------------------------------------------------------
# full-size layout (meta device)


@pytest.fixture(scope="module")
def listing():
    return read_meta_listing()


def test_listing_is_metas_released_model(listing):
    """1,134 image-model keys holding 840,509,750 parameters (32 of the keys are rotary buffers)."""
    image = {k: v for k, v in listing.items() if k.startswith("detector.") and ".sam2_convs." not in k}
    assert len(image) == 1134
    params = sum(math.prod(s) for k, (s, _) in image.items() if not k.endswith("freqs_cis"))
    assert params == 840_509_750
    assert len(listing) - len(image) == 309 + 22  # tracker keys + the tracker's FPN neck


def test_inverse_layout_reproduces_metas_keys_and_shapes(listing):
    from transformers import Sam3Config, Sam3Model, Sam3VideoConfig, Sam3VideoModel

    for cls, config, expected in (
        (Sam3VideoModel, Sam3VideoConfig(), listing),
        (
            Sam3Model,
            Sam3Config(),
            {k: v for k, v in listing.items() if k.startswith("detector.") and ".sam2_convs." not in k},
        ),
    ):
        with torch.device("meta"):
            model = cls(config)
        meta = hf_to_meta(model.state_dict(), config)
        got = {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in meta.items()}
        assert got == expected


def test_full_size_conversion_plan(listing):
    from transformers import Sam3Config, Sam3VideoConfig

    meta = {k: torch.empty(s, dtype=DTYPES[d], device="meta") for k, (s, d) in listing.items()}
    out, report = convert_meta_state_dict(meta)
    assert report.ok and report.model_class == "Sam3VideoModel"
    assert report.counts() == {
        "converted": 1427,
        "dropped": 38,
        "unexpected": 0,
        "missing": 0,
        "mis_shaped": 0,
    }
    assert len(out) == 1797
    reasons = [d["reason"] for d in report.dropped]
    assert sum("rotary" in r for r in reasons) == 32 and sum("point projections" in r for r in reasons) == 6

    from medsam3.model.configs import infer_sam3_config

    # the released architecture, except the ViT LayerNorm eps: Meta's builder uses 1e-5, transformers 1e-6
    shapes = {k: s for k, (s, _) in listing.items()}
    eps = "vision_config.backbone_config.layer_norm_eps"
    assert _same_architecture(infer_sam3_config(shapes, with_tracker=True), Sam3VideoConfig()) == {
        f"detector_config.{eps}": (1e-5, 1e-6),
        f"tracker_config.{eps}": (1e-5, 1e-6),
    }
    assert _same_architecture(infer_sam3_config(shapes), Sam3Config()) == {eps: (1e-5, 1e-6)}

    image_only = {k: v for k, v in meta.items() if k.startswith("detector.") and ".sam2_convs." not in k}
    out, report = convert_meta_state_dict(image_only)
    assert report.ok and report.model_class == "Sam3Model" and len(out) == 1468
    assert report.counts()["converted"] == 1096

    out, report = convert_meta_state_dict(meta, with_tracker=False)
    assert report.ok and report.model_class == "Sam3Model" and len(out) == 1468
    assert sum(d["reason"] == meta_keys.TRACKER_DROP_REASON for d in report.dropped) == 309 + 22


# --------------------------------------------------------------------------------------------------
# tiny models through the CLI


def _meta_convention_config():
    """A tiny video config whose head counts follow the released model (what inference assumes)."""
    from medsam3.model.configs import sam3_video_config, small_sam3_config

    detector = small_sam3_config(text_heads=1)  # 64-wide text heads, 32-wide detector heads
    detector.text_config.hidden_act = "gelu"
    detector.vision_config.backbone_config.layer_norm_eps = 1e-5
    return sam3_video_config(detector, memory_attention_layers=1)


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    """A seeded tiny Sam3VideoModel and a trainer checkpoint of it in Meta's layout."""
    from transformers import Sam3VideoModel

    torch.manual_seed(0)
    model = Sam3VideoModel(_meta_convention_config()).eval()
    tie_fourier_copies(model)
    folder = tmp_path_factory.mktemp("tiny_video")
    meta = hf_to_meta(model.state_dict(), model.config)
    checkpoint = {
        "model": meta,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]},
        "epoch": 3,
        "steps": {"train": 10},
    }
    torch.save(checkpoint, folder / "checkpoint.pt")
    return model, folder, meta


def _detector_inputs(model_config):
    from medsam3.model.loading import build_processor

    g = torch.Generator().manual_seed(3)
    image = (torch.rand(3, 200, 150, generator=g) * 255).to(torch.uint8)
    return build_processor(model_config)(images=image, text=["liver"], return_tensors="pt")


def _outputs(model, inputs):
    with torch.inference_mode():
        out = model(
            pixel_values=inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )
    return {
        n: getattr(out, n)
        for n in ("pred_masks", "pred_boxes", "pred_logits", "presence_logits", "semantic_seg")
    }


def test_cli_converts_trainer_checkpoint(tiny_video, tmp_path, capsys):
    from transformers import Sam3Model, Sam3Processor, Sam3VideoModel

    from medsam3.model.loading import load_sam3_tracker

    model, folder, meta = tiny_video
    out_dir, report_path = tmp_path / "converted", tmp_path / "report.json"
    rc = main(["convert", str(folder / "checkpoint.pt"), str(out_dir), "--report", str(report_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "converted: 467, dropped: 8, unexpected: 0, missing: 0, mis-shaped: 0" in printed
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["model_class"] == "Sam3VideoModel"
    assert report["ignored_entries"] == ["epoch", "optimizer", "steps"]
    assert {d["meta"] for d in report["dropped"]} == {
        k for k in meta if k.endswith("freqs_cis") or ".points_" in k
    }

    converted, info = Sam3VideoModel.from_pretrained(out_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    original = model.state_dict()
    assert set(converted.state_dict()) == set(original)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert _same_architecture(converted.config, model.config) == {}

    detector = Sam3Model.from_pretrained(out_dir).eval()
    processor = Sam3Processor.from_pretrained(out_dir)
    inputs = processor(
        images=(torch.rand(3, 200, 150) * 255).to(torch.uint8), text=["liver"], return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (1, 3, 224, 224) and inputs["input_ids"].shape == (1, 32)
    inputs = _detector_inputs(model.config.detector_config)
    with torch.no_grad():
        for p in detector.parameters():  # fresh memory: identical kernels, identical sums
            p.data = p.data.clone()
    ours, ref = _outputs(detector, inputs), _outputs(model.detector_model, inputs)
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name

    tracker = load_sam3_tracker(out_dir, device="cpu").model
    assert torch.equal(
        tracker.prompt_encoder.point_embed.weight, model.tracker_model.prompt_encoder.point_embed.weight
    )
    assert torch.equal(
        tracker.vision_encoder.neck.fpn_layers[0].proj1.weight, model.tracker_neck.fpn_layers[0].proj1.weight
    )


def test_cli_bare_image_state_dict_with_config_and_bf16(tmp_path, tiny_config, tiny_model):
    """Meta's image-model keys without ``detector.``, converted with an explicit config, stored in bf16."""
    from transformers import Sam3Model

    meta = hf_to_meta(tiny_model.state_dict(), tiny_config)
    torch.save({k[len("detector.") :]: v for k, v in meta.items()}, tmp_path / "image.pt")
    tiny_config.save_pretrained(tmp_path / "cfg")
    rc = main(
        [
            "convert",
            str(tmp_path / "image.pt"),
            str(tmp_path / "out"),
            "--dtype",
            "bf16",
            "--config",
            str(tmp_path / "cfg" / "config.json"),
        ]
    )
    assert rc == 0
    converted = Sam3Model.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert converted.config.text_config.num_attention_heads == 2
    for key, value in converted.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, tiny_model.state_dict()[key].to(torch.bfloat16)), key


def test_image_only_option_drops_tracker(tiny_video, tmp_path, capsys):
    _, folder, _ = tiny_video
    rc = main(["convert", str(folder / "checkpoint.pt"), str(tmp_path / "img"), "--image-only"])
    assert rc == 0
    assert json.loads((tmp_path / "img" / "config.json").read_text())["model_type"] == "sam3"
    assert "tracker weights; this conversion writes the image model only" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# bad checkpoints: clear error, exit status 2, nothing written


class Opaque:
    """An object only full unpickling (running code) could rebuild."""

    def __init__(self):
        self.note = "trainer state"


def _expect_failure(capsys, tmp_path, ckpt, *extra):
    out_dir = tmp_path / "out"
    before = set(tmp_path.iterdir())
    rc = main(["convert", str(ckpt), str(out_dir), *extra])
    assert rc == 2
    assert not out_dir.exists()
    new = set(tmp_path.iterdir()) - before
    assert all(p.suffix == ".json" for p in new), new  # at most the requested report
    return capsys.readouterr().err


def test_unknown_layout(tmp_path, capsys):
    ckpt = tmp_path / "other.pt"
    torch.save({"model": {"encoder.layer.0.weight": torch.zeros(2), "head.bias": torch.zeros(1)}}, ckpt)
    err = _expect_failure(capsys, tmp_path, ckpt)
    assert "unknown layout" in err and "encoder.layer.0.weight" in err and str(ckpt) in err
    torch.save({"epoch": 1, "note": "no tensors"}, ckpt)
    err = _expect_failure(capsys, tmp_path, ckpt)
    assert "unknown checkpoint layout" in err and "'epoch'" in err


def test_truncated_checkpoint(tiny_video, tmp_path, capsys):
    _, folder, _ = tiny_video
    data = (folder / "checkpoint.pt").read_bytes()
    ckpt = tmp_path / "truncated.pt"
    ckpt.write_bytes(data[: len(data) // 2])
    err = _expect_failure(capsys, tmp_path, ckpt)
    assert str(ckpt) in err and "truncated" in err


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    ckpt = tmp_path / "unsafe.pt"
    torch.save({"model": {"detector.x": torch.zeros(1)}, "trainer": Opaque()}, ckpt)
    err = _expect_failure(capsys, tmp_path, ckpt)
    assert "refused for safety" in err and str(ckpt) in err


def test_missing_and_mis_shaped_keys_are_reported(tiny_video, tmp_path, capsys):
    _, _, meta = tiny_video
    broken = dict(meta)
    del broken["detector.transformer.decoder.presence_token.weight"]
    broken["tracker.no_obj_ptr"] = torch.zeros(1, 7)
    broken["detector.backbone.vision_backbone.trunk.blocks.0.attn.extra_scale"] = torch.ones(1)
    ckpt = tmp_path / "broken.pt"
    torch.save({"model": broken}, ckpt)
    err = _expect_failure(capsys, tmp_path, ckpt, "--report", str(tmp_path / "r.json"))
    assert "missing: 1" in err and "mis-shaped: 1" in err and "unexpected: 1" in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["ok"]
    assert report["missing"] == ["detector_model.detr_decoder.presence_token.weight"]
    assert report["unexpected"] == ["detector.backbone.vision_backbone.trunk.blocks.0.attn.extra_scale"]
    assert report["mis_shaped"][0]["transformers"] == "tracker_model.no_object_pointer"
    assert report["mis_shaped"][0]["got"] == [1, 7]


def test_existing_output_folder_is_kept(tiny_video, tmp_path, capsys):
    _, folder, _ = tiny_video
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    rc = main(["convert", str(folder / "checkpoint.pt"), str(out_dir)])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]


def test_output_folder_may_not_hold_the_input(tiny_video, tmp_path, capsys):
    import shutil

    _, folder, _ = tiny_video
    shutil.copy(folder / "checkpoint.pt", tmp_path / "checkpoint.pt")
    rc = main(["convert", str(tmp_path / "checkpoint.pt"), str(tmp_path), "--overwrite"])
    assert rc == 2 and "would contain or replace the input" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
