"""``scripts/train_nano.sh`` from scratch, end to end, on the real samples, with 2 optimizer steps a stage.

The bundled model took about 195 minutes of CPU training (MODEL_CARD.md); this runs every step of the same
script (prepare the four manifests with the fixed split and the negatives of other modalities, the seven
stages from random weights, the float16 bundle with its vocabulary and training domain) with
``NANO_STEPS*=2`` into a temporary folder (``NANO_BUNDLE``), so that a change that breaks the recipe shows
here and not hours into a run. The weights are of course not the bundled ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage8")


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("nano_script")
    work, bundle = out / "work", out / "bundle"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({f"NANO_STEPS{i}": "2" for i in (1, 2, 3, 4, 5, 6, 8)})
    env.update(NANO_BUNDLE=str(bundle), NANO_STAGES="prepare train bundle", OMP_NUM_THREADS="2")
    run = subprocess.run(
        ["bash", "scripts/train_nano.sh", str(data_dir), str(work)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work, bundle


def test_every_stage_runs_from_random_weights_and_the_bundle_loads(scripted_run):
    from safetensors import safe_open

    from medsam3.model.domain import ModelDomain
    from medsam3.model.loading import load_sam3

    work, bundle = scripted_run
    for stage in STAGES:
        metrics = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
        steps = [m["step"] for m in metrics if "loss" in m]
        assert max(steps) == 2, stage
        assert (work / stage / "export" / "final" / "model.safetensors").is_file(), stage
    # stage 1 starts from random weights, each later stage from the export before it (stage 8: in float16)
    assert "source: small" in (work / "stage1" / "config.yaml").read_text()
    stage8 = (work / "stage8" / "config.yaml").read_text()
    assert str(work / "stage6" / "export" / "float16") in stage8 and "manifest_ood.jsonl" in stage8

    names = {p.name for p in bundle.iterdir()}
    expected = {"model.safetensors", "config.json", "tokenizer.json", "concepts.json", "domain.safetensors"}
    assert expected <= names
    with safe_open(str(bundle / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    concepts = json.loads((bundle / "concepts.json").read_text())
    known = {"fetal head", "polyp", "hippocampus", "anterior hippocampus", "posterior hippocampus"}
    assert set(concepts["concepts"]) == known
    domain = ModelDomain.load(bundle / "domain.safetensors")
    assert set(domain.concepts) == known and all(c.threshold > 0 for c in domain.concepts.values())
    loaded = load_sam3(bundle, device="cpu", dtype="fp32")
    assert loaded.model.config.vision_config.backbone_config.image_size == 336
    assert all(np.isfinite(p.detach().numpy()).all() for p in loaded.model.parameters())
