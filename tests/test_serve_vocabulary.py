"""The HTTP server with a model that records its concepts (the bundled ``medsam3-nano``).

``/api/info`` lists the concepts; a prompt outside them is answered as an absent label with the reason
``unknown concept`` and ``known_concepts`` (in the job result and the summary file) and marks no pixel or
voxel; ``allow_unknown_concepts`` in the request segments it anyway; the tiny open-vocabulary model of the
other serve tests reports no concepts and segments any prompt.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import medsam3
from medsam3.model.resolve import BUNDLED_MODEL_DIR
from serve_fixtures import client_for, make_settings, segment, upload

SAMPLES = Path(medsam3.__file__).resolve().parent / "assets" / "samples"
NANO_CONCEPTS = ["anterior hippocampus", "fetal head", "hippocampus", "polyp", "posterior hippocampus"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(BUNDLED_MODEL_DIR, tmp_path_factory.mktemp("nano-serve"), threshold=0.1)
    with client_for(settings) as c:
        yield c


def test_info_lists_the_models_concepts(client, serve_model, tmp_path):
    concepts = client.get("/api/info").json()["concepts"]
    assert concepts["known"] == NANO_CONCEPTS and concepts["open_vocabulary"] is False
    domain = concepts["training_domain"]  # concept -> distance threshold of domain.safetensors
    assert sorted(domain) == NANO_CONCEPTS and all(0 < t < 1 for t in domain.values())
    with client_for(make_settings(serve_model, tmp_path)) as tiny:
        assert tiny.get("/api/info").json()["concepts"] is None


def test_unknown_prompt_is_absent_with_the_known_concepts(client):
    image_id = upload(client, SAMPLES / "hc18_400_HC.png").json()["image_id"]
    job = segment(client, image_id, {"prompts": [{"text": "liver"}, {"text": "foetal head"}]})
    assert job["status"] == "done", job
    liver, head = job["result"]["labels"]
    assert (
        liver["absent"] and liver["reason"] == "unknown concept" and liver["known_concepts"] == NANO_CONCEPTS
    )
    assert liver["color"] is not None  # semantic mode: value 1 is reserved for it
    assert not head["absent"] and head["area_px"] > 0
    mask = np.asarray(PILImage.open(io.BytesIO(client.get(f"/api/jobs/{job['job_id']}/mask").content)))
    assert set(np.unique(mask).tolist()) == {0, 2}
    summary = client.get(f"/api/jobs/{job['job_id']}/summary").json()
    assert summary["labels"][0]["reason"] == "unknown concept"
    assert summary["settings"]["vocabulary"]["concepts"] == NANO_CONCEPTS

    allowed = segment(client, image_id, {"prompts": [{"text": "liver"}], "allow_unknown_concepts": True})
    assert allowed["status"] == "done" and allowed["result"]["labels"][0]["reason"] != "unknown concept"


def test_volume_slice_and_whole_volume(client):
    image_id = upload(client, SAMPLES / "hippocampus_019.nii.gz").json()["image_id"]
    body = {"prompts": [{"text": "kidney"}, {"text": "hippocampus"}]}
    whole = segment(client, image_id, body)
    assert whole["status"] == "done", whole
    kidney, hippo = whole["result"]["labels"]
    assert kidney["reason"] == "unknown concept" and kidney["voxels"] == 0 and hippo["voxels"] > 1000
    one = segment(client, image_id, {**body, "slice": {"plane": "axial", "index": 17}})
    assert one["status"] == "done", one
    assert one["result"]["labels"][0]["reason"] == "unknown concept"
