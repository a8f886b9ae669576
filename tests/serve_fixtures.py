"""Helpers shared by the ``medsam3 serve`` tests: a tiny model folder, an app, upload and job helpers.

The model is a tiny random ``Sam3VideoModel`` saved with :func:`medsam3.model.loading.save_sam3` (so the
server loads its detector for text / box prompts and its tracker for point prompts). Its presence head and
the tracker's object-score head are biased towards "present", so that with threshold 0 every prompt keeps a
mask: the tests check plumbing, geometry and formats, not accuracy. The ``serve_model`` fixture of
``conftest.py`` builds it once per test session.
"""

from __future__ import annotations

import contextlib
import io
import time
import zipfile
from pathlib import Path

HC18 = "hc18_ultrasound/training_set/000_HC.png"  # grey PNG 800 x 540
KVASIR = "kvasir_seg_sample/images/cju0sxqiclckk08551ycbwhno.jpg"  # RGB JPEG 570 x 531
HIPPO = "msd_hippocampus/images/hippocampus_001.nii.gz"  # MR NIfTI (35, 51, 35)
BREAST = "pyradiomics/breast1_image.nrrd"  # MR NRRD (21, 120, 45)
CT3 = "dcmqi_ct3slice/ct-3slice"  # CT DICOM series, 3 slices of 512 x 512


def build_model(folder: Path) -> Path:
    """Save the biased tiny video model (module docstring) into ``folder``; returns it."""
    import torch
    from transformers import Sam3VideoModel

    from medsam3.model.configs import tiny_sam3_video_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    config = tiny_sam3_video_config()
    model = Sam3VideoModel(config).eval()
    with torch.no_grad():
        model.detector_model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
        model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    return save_sam3(model, build_processor(config, video=True), folder)


def make_settings(model: Path, work: Path, **overrides):
    from medsam3.serve.settings import ServeSettings

    values = dict(
        model=str(model),
        device="cpu",
        dtype="fp32",
        work_dir=work,
        threshold=0.0,
        presence_threshold=0.5,
        allowed_hosts=("testserver",),  # the Host of the test client
    )
    values.update(overrides)
    return ServeSettings(**values)


@contextlib.contextmanager
def client_for(settings, **client_kwargs):
    """A started app (lifespan run) and its TestClient."""
    from fastapi.testclient import TestClient

    from medsam3.serve.app import create_app

    app = create_app(settings)
    with TestClient(app, **client_kwargs) as client:
        yield client


def upload(
    client,
    path: Path | None = None,
    *,
    data: bytes | None = None,
    name: str | None = None,
    headers: dict | None = None,
):
    """POST a file to /api/images as multipart; returns the response."""
    content = data if data is not None else Path(path).read_bytes()
    return client.post("/api/images", files={"file": (name or Path(path).name, content)}, headers=headers)


def wait_job(client, job_id: str, timeout: float = 60.0, headers: dict | None = None) -> dict:
    """Poll a job until it is done or failed; returns its status record."""
    deadline = time.time() + timeout
    while True:
        status = client.get(f"/api/jobs/{job_id}", headers=headers).json()
        if status["status"] in ("done", "failed") or time.time() > deadline:
            return status
        time.sleep(0.05)


def segment(client, image_id: str, body: dict, headers: dict | None = None) -> dict:
    """Submit a segmentation, wait for it, return the final status (asserting it was accepted)."""
    r = client.post(f"/api/images/{image_id}/segment", json=body, headers=headers)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["job_id"], headers=headers)


def zip_folder(folder: Path, out: Path) -> Path:
    """Zip the files of ``folder`` (flat) into ``out``."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                zf.write(f, f"series/{f.name}")
    return out


def zip_bytes(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    """A zip archive in memory from ``(name or ZipInfo, data)`` pairs (deflated)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()
