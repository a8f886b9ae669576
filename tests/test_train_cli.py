"""``medsam3 train``: configuration files and overrides, the shipped configs, and bad inputs refused before
step 1 with a clear message (exit status 2, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from medsam3 import cli
from medsam3.data.indexing import prepare_dataset
from medsam3.data.manifest import write_manifest
from medsam3.errors import InputError
from medsam3.train.config import TrainConfig, build_config, config_from_dict, config_to_dict, parse_overrides

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def medsam3(monkeypatch):
    """``medsam3 ...`` in-process; ``train`` is added to the command list when the CLI lacks it."""
    if "train" not in cli.COMMANDS:
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "train"))
    return cli.main


def hippocampus_manifest(data_dir: Path, tmp_path: Path, cases=("hippocampus_001",)) -> tuple[Path, list]:
    """An MSD-layout copy of hippocampus cases in ``tmp_path``, prepared into a manifest."""
    src, root = data_dir / "msd_hippocampus", tmp_path / "Task04_Hippocampus"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case in cases:
        shutil.copy(src / "images" / f"{case}.nii.gz", root / "imagesTr" / f"{case}.nii.gz")
        shutil.copy(src / "labels" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    doc = {
        "name": "Hippocampus",
        "modality": {"0": "MRI"},
        "training": training,
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": len(cases),
    }
    (root / "dataset.json").write_text(json.dumps(doc))
    records, _, _ = prepare_dataset("Task04_Hippocampus", "nnunet", root)
    for r in records:
        r.split = "train"
    return write_manifest(tmp_path / "manifest.jsonl", records), records


# ------------------------------------------------------------------------------------------- config


def test_defaults_are_the_papers_recipe():
    c = TrainConfig()
    lrs = (c.optim.lr_decoder, c.optim.lr_vision, c.optim.lr_text, c.optim.lr_geometry)
    assert lrs == (3e-4, 5e-5, 5e-5, 1e-4)
    assert (c.optim.layer_decay, c.optim.weight_decay, c.optim.grad_clip) == (0.85, 0.05, 0.1)
    assert c.optim.betas == [0.9, 0.999] and c.mode == "full" and c.epochs == 10 and c.batch_size == 1


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "optim:\n  lr_decoder: 1e-4\n  betas: [0.8, 0.99]\nmax_steps: 7\nmodel:\n  size: {vit_layers: 1}\n"
    )
    cfg = build_config(
        path,
        [
            "max_steps=9",
            "optim.layer_decay=0.9",
            "data.group_temperature=2",
            "steps_per_epoch=null",
            "model.size={image_size: 112}",
        ],
    )
    assert cfg.optim.lr_decoder == 1e-4  # YAML 1.1 reads "1e-4" as text: accepted for float fields
    assert cfg.optim.betas == [0.8, 0.99] and cfg.max_steps == 9 and cfg.optim.layer_decay == 0.9
    assert cfg.data.group_temperature == 2.0 and cfg.steps_per_epoch is None
    assert cfg.model.size == {"vit_layers": 1, "image_size": 112}  # mappings merge
    assert cfg.optim.lr_vision == 5e-5  # untouched default
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    # null clears a mapping the YAML file set (e.g. to start from a folder instead of a random model)
    cleared = build_config(path, ["model.size=null", "model.source=models/x"])
    assert cleared.model.size == {} and cleared.model.source == "models/x"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr_decodr=1"], "unknown key 'optim.lr_decodr'"),
        (["max_steps=many"], "max_steps = 'many' must be of type int"),
        (["mode=half"], "mode = 'half' is not valid"),
        (["optim.layer_decay=1.5"], "optim.layer_decay"),
        (["batch_size=0"], "batch_size"),
        (["optim=3"], "optim must be a mapping"),
        (["max_steps"], "not of the form key=value"),
    ],
)
def test_bad_configuration_values(overrides, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(None, overrides)


def test_shipped_configs(medsam3, capsys):
    for name in ("paper_full", "lora", "tiny_cpu"):
        assert (
            medsam3(
                ["train", str(REPO / "configs" / f"{name}.yaml"), "data.manifest=m.jsonl", "--print-config"]
            )
            == 0
        )
        doc = yaml.safe_load(capsys.readouterr().out)
        assert doc["data"]["manifest"] == "m.jsonl"
        if name == "paper_full":
            o = doc["optim"]
            lrs = (o["lr_decoder"], o["lr_vision"], o["lr_text"], o["lr_geometry"])
            assert lrs == (3e-4, 5e-5, 5e-5, 1e-4)
            rest = (o["layer_decay"], o["weight_decay"], o["grad_clip"], o["betas"])
            assert rest == (0.85, 0.05, 0.1, [0.9, 0.999])
            assert doc["mixed_precision"] == "bf16" and doc["epochs"] == 10
            assert doc["box_prompt_fraction"] == 0.5
            assert doc["box_noise_std"] == 0.1 and doc["model"]["activation_checkpointing"] is True
        if name == "lora":
            assert doc["mode"] == "lora" and doc["lora"]["rank"] == 16
    for name in ("nano", "nano_stage2", "nano_stage4"):
        assert (
            medsam3(
                ["train", str(REPO / "configs" / f"{name}.yaml"), "data.manifest=m.jsonl", "--print-config"]
            )
            == 0
        )
        doc = yaml.safe_load(capsys.readouterr().out)
        if name == "nano_stage4":
            augment = doc["data"]["augment"]
            assert augment["enabled"] is True and augment["scale"] == [0.75, 1.3]
            assert doc["loss"]["overrides"]["match_score_weight"] == 1.0
            assert doc["data"]["cross_group_share"] == 0.3
        else:
            assert doc["data"]["augment"]["enabled"] is False


# ------------------------------------------------------------------------------------------- runs


def test_train_command_runs_and_exports(medsam3, tmp_path, data_dir, capsys):
    manifest, _ = hippocampus_manifest(data_dir, tmp_path)
    run_dir = tmp_path / "run"
    code = medsam3(
        [
            "train",
            str(REPO / "configs" / "tiny_cpu.yaml"),
            f"data.manifest={manifest}",
            f"run_dir={run_dir}",
            "max_steps=2",
            "model.size={image_size: 112}",
            "data.val_max_items=2",
            "data.val_split=train",
            "progress=false",
            "export=final",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training finished at step 2 of 2" in out and f"final model: {run_dir / 'export' / 'final'}" in out
    assert (run_dir / "export" / "final" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "tensorboard").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/loss_ce",
        "train/grad_norm",
        "lr/decoder",
        "lr/vision.block00",
        "val/dice_mean",
        "val/dice/Task04_Hippocampus",
    } <= tags, tags
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["data"]["verify"] == "full"
    assert saved["optim"]["lr_decoder"] == 2e-3


def _refused(medsam3, capsys, args, message: str, run_dir: Path) -> str:
    assert medsam3(["train", *args, f"run_dir={run_dir}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    return err


def test_bad_inputs_are_refused_before_step_one(medsam3, tmp_path, data_dir, capsys):
    config = str(REPO / "configs" / "tiny_cpu.yaml")
    run_dir = tmp_path / "run"
    _refused(medsam3, capsys, [str(tmp_path / "none.yaml")], "config file not found", run_dir)
    _refused(medsam3, capsys, [config], "data.manifest is required", run_dir)
    _refused(
        medsam3,
        capsys,
        [config, f"data.manifest={tmp_path / 'missing.jsonl'}"],
        "manifest not found",
        run_dir,
    )

    manifest, records = hippocampus_manifest(data_dir, tmp_path)
    label = Path(records[0].label[0])
    original = sitk.ReadImage(str(label))
    args = [config, f"data.manifest={manifest}"]

    # a label value that the dataset's labels (dataset.json) do not name
    array = sitk.GetArrayFromImage(original)
    array[array.shape[0] // 2, 0, 0] = 3
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(original)
    sitk.WriteImage(bad, str(label))
    err = _refused(medsam3, capsys, args, "label value 3 is not among the dataset's labels", run_dir)
    assert str(label) in err

    # a label whose grid differs from its image
    shifted = sitk.GetImageFromArray(sitk.GetArrayFromImage(original))
    shifted.CopyInformation(original)
    shifted.SetOrigin(tuple(np.asarray(original.GetOrigin()) + 5.0))
    sitk.WriteImage(shifted, str(label))
    headers = [*args, "data.verify=headers"]
    err = _refused(medsam3, capsys, headers, "label grid differs from its image", run_dir)
    assert "origin" in err and str(label) in err
    cropped = sitk.GetImageFromArray(sitk.GetArrayFromImage(original)[:, :-2])
    sitk.WriteImage(cropped, str(label))
    _refused(medsam3, capsys, headers, "label grid differs from its image", run_dir)

    # a file the manifest lists is gone
    label.unlink()
    err = _refused(medsam3, capsys, args, "does not exist", run_dir)
    assert str(label) in err
