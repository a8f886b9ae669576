"""The training loop on real HC18 ultrasound images: the loss falls, the model fits, exports load.

Tiny random SAM3 at 112 px; manifests are built from the samples in ``data_dir`` by the data module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3.data.indexing import prepare_dataset
from medsam3.data.labels import load_label_arrays
from medsam3.data.manifest import write_manifest
from medsam3.evaluate.metrics import dice
from medsam3.train.checkpoint import load_checkpoint
from medsam3.train.config import build_config
from medsam3.train.loop import build_model, train

FAST = {
    "model": {"size": {"image_size": 112}},
    "optim": {
        "lr_decoder": 2e-3,
        "lr_vision": 2e-3,
        "lr_text": 2e-3,
        "lr_geometry": 2e-3,
        "lr_fusion_encoder": 2e-3,
        "layer_decay": 1.0,
        "grad_clip": 1.0,
        "warmup_steps": 5,
        "timescale": 1000,
        "cooldown_steps": 0,
    },
    "data": {"negative_fraction": 0.0, "val_split": "train"},
    "mixed_precision": "no",
    "progress": False,
    "tensorboard": False,
}


def hc18_manifest(data_dir: Path, out: Path, n: int = 3) -> tuple[Path, list]:
    """A manifest of the first ``n`` HC18 images (all in the train split), written to ``out``."""
    opts = {"images": "training_set/*_HC.png", "mask": "{stem}_Annotation.png"}
    records, _, _ = prepare_dataset(
        "HC18",
        "folder2d",
        data_dir / "hc18_ultrasound",
        options=opts,
        labels={1: "fetal head"},
        modality="US",
    )
    records = sorted(records, key=lambda r: r.case_id)[:n]
    for r in records:
        r.split = "train"
    return write_manifest(out / "manifest.jsonl", records), records


def config(tmp_path: Path, manifest: Path, **extra):
    doc = {**FAST, "data": {**FAST["data"], "manifest": str(manifest)}, "run_dir": str(tmp_path / "run")}
    for key, value in extra.items():
        if isinstance(value, dict):
            doc[key] = {**doc.get(key, {}), **value}
        else:
            doc[key] = value
    return build_config(None, doc)


def segment_dice(cli_main, image: str, model_dir: Path, out: Path, reference: np.ndarray) -> float:
    """Dice of ``medsam3 segment IMAGE -p "fetal head" --model MODEL_DIR`` against ``reference``."""
    from PIL import Image as PILImage

    assert (
        cli_main(
            [
                "segment",
                image,
                "-p",
                "fetal head",
                "--model",
                str(model_dir),
                "-o",
                str(out),
                "--device",
                "cpu",
                "--no-overlay",
            ]
        )
        == 0
    )
    mask = np.asarray(PILImage.open(out / f"{Path(image).stem}_mask.png"))
    return dice(mask == 1, reference)


def check_fit_and_segment(tmp_path, data_dir, steps: int, val_every: int, min_dice: float) -> float:
    from medsam3.cli import main as cli_main

    manifest, records = hc18_manifest(data_dir, tmp_path)
    cfg = config(tmp_path, manifest, max_steps=steps, val_every=val_every, export="best", log_every=10)
    result = train(cfg)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == steps and result.finished
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    by_step = {v["step"]: v["val"] for v in result.validations}
    assert sorted(by_step) == list(range(val_every, steps + 1, val_every))
    best = by_step[result.best_step]
    assert result.best_metric == best["dice_mean"] == max(v["dice_mean"] for v in by_step.values())
    assert best["items"] == 3 and best["dice_mean"] > min_dice
    # The exported best model is what `medsam3 segment --model` loads; the Dice it gives on the training
    # images is the validation Dice (same preprocessing, forward and inference rule).
    dices = [
        segment_dice(
            cli_main, r.image[0], result.exports["best"], tmp_path / "seg", load_label_arrays(r).semantic == 1
        )
        for r in records
    ]
    assert np.mean(dices) == pytest.approx(best["dice_mean"], abs=1e-6)
    return best["dice_mean"]


def test_loss_falls_and_the_export_segments_like_validation(tmp_path, data_dir):
    check_fit_and_segment(tmp_path, data_dir, steps=40, val_every=20, min_dice=0.3)


@pytest.mark.slow
def test_overfits_three_images_to_dice_above_0_9(tmp_path, data_dir):
    check_fit_and_segment(tmp_path, data_dir, steps=200, val_every=40, min_dice=0.9)


def _changed(a: dict, b: dict, prefix: tuple[str, ...]) -> set[str]:
    return {k for k in a if k.startswith(prefix) and not torch.equal(a[k], b[k])}


def test_decoder_mode_leaves_the_encoders_untouched(tmp_path, data_dir):
    manifest, _ = hc18_manifest(data_dir, tmp_path, n=2)
    cfg = config(tmp_path, manifest, mode="decoder", max_steps=2, export="none", data={"val_max_items": 0})
    initial = {k: v.clone() for k, v in build_model(cfg)[0].state_dict().items()}
    train(cfg)
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert not _changed(initial, final, ("vision_encoder.", "text_encoder."))
    assert _changed(initial, final, ("detr_decoder.",)) and _changed(initial, final, ("text_projection.",))


def test_lora_trains_adapters_and_heads_and_exports_a_merged_model(tmp_path, data_dir):
    from medsam3.model.loading import load_sam3
    from medsam3.train.lora import merge_lora

    manifest, _ = hc18_manifest(data_dir, tmp_path, n=2)
    cfg = config(
        tmp_path,
        manifest,
        mode="lora",
        max_steps=2,
        export="final",
        data={"val_max_items": 0},
        lora={"rank": 4, "alpha": 8, "dropout": 0.0},
    )
    initial = {k: v.clone() for k, v in build_model(cfg)[0].state_dict().items()}
    result = train(cfg)
    final = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    frozen = {
        k
        for k in initial
        if k.startswith(("vision_encoder.backbone.", "text_encoder.")) and ".lora_" not in k
    }
    assert frozen and not _changed(initial, final, tuple(frozen))
    adapters = {k for k in initial if ".lora_B." in k}
    assert adapters and all(not torch.equal(initial[k], final[k]) for k in adapters)
    assert _changed(initial, final, ("detr_decoder.",))
    assert _changed(initial, final, ("vision_encoder.neck.",))
    # The export is a plain SAM3 folder with the adapters merged.
    loaded = load_sam3(str(result.exports["final"]), device="cpu", dtype="fp32")
    holder = build_model(cfg)[0]
    holder.load_state_dict(final)
    merged = merge_lora(holder).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        a = loaded.model.get_vision_features(pixel_values=x).fpn_hidden_states[-1]
        b = merged.get_vision_features(pixel_values=x).fpn_hidden_states[-1]
    assert torch.allclose(a, b, atol=1e-5)
