"""``medsam3 serve`` HTTP API: uploads of every format from real samples, every prompt type, result files in
the upload's format and geometry, viewer data, the vision-feature cache, the queue, the token and expiry.

A tiny random SAM3 (biased to "present", see ``serve_fixtures``) is saved to a folder and loaded by the app
as a user's model would be.
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from medsam3.io.readers import read_image, read_label_map
from serve_fixtures import (
    BREAST,
    CT3,
    HC18,
    HIPPO,
    KVASIR,
    client_for,
    make_settings,
    segment,
    upload,
    wait_job,
    zip_folder,
)


@pytest.fixture(scope="module")
def client(serve_model, tmp_path_factory):
    with client_for(make_settings(serve_model, tmp_path_factory.mktemp("work"))) as c:
        yield c


def done(status: dict) -> dict:
    assert status["status"] == "done", status
    return status["result"]


def same_geometry(a, b) -> bool:
    return (
        a.spatial_shape == b.spatial_shape
        and np.allclose(a.spacing, b.spacing, atol=1e-4)
        and np.allclose(a.origin, b.origin, atol=1e-3)
        and np.allclose(a.direction, b.direction, atol=1e-5)
    )


# --------------------------------------------------------------------------------------------------
# uploads and results per format


def test_png_upload_text_prompt_and_viewer_data(client, data_dir, tmp_path):
    r = upload(client, data_dir / HC18)
    assert r.status_code == 201, r.text
    info = r.json()
    # HC18 images are 800 x 540 grey PNGs without a stated pixel size.
    assert info["shape"] == [540, 800] and info["ndim"] == 2 and not info["is_3d"]
    assert info["format"] == "PNG" and info["kind"] == "png" and not info["spacing_known"]
    assert info["display"]["shape"] == [1, 540, 800] and info["display"]["channels"] == 1
    assert info["display"]["planes"] == {
        "image": dict(count=1, rows=540, cols=800, row_spacing=1.0, col_spacing=1.0)
    }
    assert client.get(f"/api/images/{info['image_id']}").json() == info

    # 8-bit ultrasound is shown as stored: the display volume is the PNG's pixels.
    raw = client.get(f"/api/images/{info['image_id']}/display")
    assert raw.headers["x-shape"] == "1,540,800"
    pixels = np.asarray(PILImage.open(data_dir / HC18))
    np.testing.assert_array_equal(np.frombuffer(raw.content, np.uint8).reshape(540, 800), pixels)
    png = client.get(f"/api/images/{info['image_id']}/slices/image/0.png")
    np.testing.assert_array_equal(np.asarray(PILImage.open(io.BytesIO(png.content))), pixels)

    status = segment(client, info["image_id"], {"prompts": [{"text": "fetal head"}]})
    result = done(status)
    assert result["scope"] == {"kind": "image"} and result["files"]["mask"] == "mask.png"
    (entry,) = result["labels"]
    assert entry["name"] == "fetal head" and entry["value"] == 1 and not entry["absent"]
    assert entry["prompt"]["kind"] == "text" and entry["area_px"] > 0 and entry["area_mm2"] is None

    mask_r = client.get(f"/api/jobs/{status['job_id']}/mask")
    assert mask_r.headers["content-type"] == "image/png"
    assert 'filename="000_HC_mask.png"' in mask_r.headers["content-disposition"]
    mask = np.asarray(PILImage.open(io.BytesIO(mask_r.content)))
    assert mask.shape == (540, 800) and set(np.unique(mask).tolist()) <= {0, 1}
    assert int((mask == 1).sum()) == entry["area_px"]

    labels = client.get(f"/api/jobs/{status['job_id']}/labels")
    assert labels.headers["x-shape"] == "1,540,800" and labels.headers["x-dtype"] == "uint8"
    np.testing.assert_array_equal(np.frombuffer(labels.content, np.uint8).reshape(540, 800), mask)
    value_png = client.get(f"/api/jobs/{status['job_id']}/slices/image/0.png")
    np.testing.assert_array_equal(np.asarray(PILImage.open(io.BytesIO(value_png.content))), mask)
    overlay = np.asarray(
        PILImage.open(
            io.BytesIO(client.get(f"/api/jobs/{status['job_id']}/slices/image/0.png?style=overlay").content)
        )
    )
    assert overlay.shape == (540, 800, 4)
    np.testing.assert_array_equal(
        overlay[mask == 1], np.array([*entry["color"], 255], np.uint8)[None].repeat(int((mask == 1).sum()), 0)
    )
    assert not overlay[mask == 0].any()

    summary = client.get(f"/api/jobs/{status['job_id']}/summary").json()
    assert summary["image"]["name"] == "000_HC.png" and summary["labels"][0]["area_px"] == entry["area_px"]
    assert summary["settings"]["model"] == "model"  # the model folder's name, not its server path
    assert "/" not in json.dumps(summary["image"])


def test_test_time_mirroring_on_an_image_and_a_volume(client, data_dir):
    """'tta': four encodings per image or slice, recorded in the summary; a whole volume too."""
    image_id = upload(client, data_dir / KVASIR).json()["image_id"]
    status = segment(
        client, image_id, {"prompts": [{"text": "polyp", "boxes": [[100, 120, 300, 330]]}], "tta": True}
    )
    done(status)
    summary = client.get(f"/api/jobs/{status['job_id']}/summary").json()
    assert summary["settings"]["test_time_mirroring"] == ["none", "x", "y", "xy"]
    assert summary["settings"]["image_encoder_runs"] == 4
    plain = segment(client, image_id, {"prompts": [{"text": "polyp", "boxes": [[100, 120, 300, 330]]}]})
    done(plain)
    settings = client.get(f"/api/jobs/{plain['job_id']}/summary").json()["settings"]
    assert settings["test_time_mirroring"] is None and settings["image_encoder_runs"] == 1

    volume_id = upload(client, data_dir / HIPPO).json()["image_id"]
    status = segment(client, volume_id, {"prompts": [{"text": "hippocampus"}], "tta": True})
    done(status)
    summary = client.get(f"/api/jobs/{status['job_id']}/summary").json()
    slices = summary["settings"]["slices"]
    assert summary["settings"]["image_encoder_runs"] == 4 * slices


def test_jpeg_colour_upload_box_and_text_box(client, data_dir):
    info = upload(client, data_dir / KVASIR).json()
    assert info["shape"] == [531, 570] and info["is_color"] and info["display"]["channels"] == 3
    assert info["modality"] == "RGB" and info["format"] == "JPEG"
    raw = np.frombuffer(client.get(f"/api/images/{info['image_id']}/display").content, np.uint8)
    np.testing.assert_array_equal(raw.reshape(531, 570, 3), np.asarray(PILImage.open(data_dir / KVASIR)))

    box = [100.0, 120.0, 300.0, 330.0]
    result = done(
        segment(client, info["image_id"], {"prompts": [{"boxes": [box]}, {"text": "polyp", "boxes": [box]}]})
    )
    kinds = [e["prompt"]["kind"] for e in result["labels"]]
    assert kinds == ["box", "text+box"] and result["labels"][0]["name"] == "1 box"
    assert result["labels"][1]["prompt"]["boxes"] == [box]
    assert result["files"]["mask"] == "mask.png"


def test_points_with_and_without_text(client, data_dir):
    info = upload(client, data_dir / HC18).json()
    status = segment(
        client,
        info["image_id"],
        {
            "prompts": [
                {"points": [[400, 270]]},
                {"text": "fetal head", "points": [[420, 300], [10, 10]], "point_labels": [1, 0]},
            ]
        },
    )
    point, text = done(status)["labels"]
    assert point["source"] == "tracker" and point["prompt"]["kind"] == "point" and not point["absent"]
    assert text["source"] == "detector" and text["prompt"]["kind"] == "text+point"
    assert text["prompt"]["point_labels"] == [1, 0]


def test_nifti_volume_slice_and_whole_volume(client, data_dir, tmp_path):
    reference = read_image(data_dir / HIPPO)
    info = upload(client, data_dir / HIPPO).json()
    assert info["is_3d"] and info["shape"] == list(reference.spatial_shape) == [35, 51, 35]
    assert info["format"] == "NIfTI" and info["modality"] == "MR"
    planes = info["display"]["planes"]
    assert sorted(planes) == ["axial", "coronal", "sagittal"]
    z, y, x = info["display"]["shape"]
    assert (planes["axial"]["count"], planes["coronal"]["count"], planes["sagittal"]["count"]) == (z, y, x)
    assert sorted(info["display"]["shape"]) == sorted(reference.spatial_shape)  # a permutation, no resampling

    index = planes["coronal"]["count"] // 2
    status = segment(
        client,
        info["image_id"],
        {"prompts": [{"text": "hippocampus"}], "slice": {"plane": "coronal", "index": index}},
    )
    result = done(status)
    assert result["scope"] == {"kind": "slice", "plane": "coronal", "index": index}
    f = tmp_path / "mask.nii.gz"
    f.write_bytes(client.get(f"/api/jobs/{status['job_id']}/mask").content)
    mask = read_label_map(f)
    assert same_geometry(mask, reference)
    labels = np.frombuffer(client.get(f"/api/jobs/{status['job_id']}/labels").content, np.uint8)
    display = labels.reshape(z, y, x)
    # Only the segmented coronal slice holds labels; the display copy holds the same voxels reoriented.
    assert display.any() and not np.delete(display, index, axis=1).any()
    assert int(mask.array.astype(bool).sum()) == int(display.astype(bool).sum())
    assert result["labels"][0]["area_px"] == int((display == 1).sum())

    # The whole volume goes through the same Segmenter call: done with the volume's shape, or a clear error
    # from a segmenter that handles 2D images only.
    whole = segment(client, info["image_id"], {"prompts": [{"text": "hippocampus"}]})
    if whole["status"] == "done":
        assert whole["result"]["shape"] == [35, 51, 35] and whole["result"]["scope"] == {"kind": "volume"}
    else:
        assert whole["status"] == "failed" and "3D" in whole["error"]
        assert "hippocampus_001.nii.gz" in whole["error"] and "/" not in whole["error"].split(":")[0]


def test_nrrd_box_on_a_slice_keeps_geometry_and_names(client, data_dir, tmp_path):
    reference = read_image(data_dir / BREAST)
    info = upload(client, data_dir / BREAST).json()
    assert info["format"] == "NRRD" and info["shape"] == [21, 120, 45]
    geo = info["display"]["planes"]["axial"]
    box = [2.0, 3.0, geo["cols"] - 2.0, geo["rows"] - 3.0]
    status = segment(
        client,
        info["image_id"],
        {"prompts": [{"text": "lesion", "boxes": [box]}], "slice": {"plane": "axial", "index": 10}},
    )
    assert done(status)["files"]["mask"] == "mask.nrrd"
    out = tmp_path / "mask.nrrd"
    out.write_bytes(client.get(f"/api/jobs/{status['job_id']}/mask").content)
    mask = read_label_map(out)
    assert same_geometry(mask, reference)
    assert mask.meta["label_names"] == {1: "lesion"}
    assert mask.array.any()


def test_dicom_zip_gives_nifti_and_dicom_seg(client, data_dir, tmp_path):
    archive = zip_folder(data_dir / CT3, tmp_path / "ct.zip")
    reference = read_image(data_dir / CT3)
    info = upload(client, archive).json()
    assert info["kind"] == "dicom-zip" and info["modality"] == "CT" and info["shape"] == [3, 512, 512]
    assert info["dicom_seg"] and info["mask_format"] == "nii.gz"
    status = segment(
        client, info["image_id"], {"prompts": [{"text": "liver"}], "slice": {"plane": "axial", "index": 1}}
    )
    result = done(status)
    assert result["files"] == {"mask": "mask.nii.gz", "summary": "summary.json", "dicom_seg": "mask.seg.dcm"}
    nii = tmp_path / "mask.nii.gz"
    nii.write_bytes(client.get(f"/api/jobs/{status['job_id']}/mask").content)
    seg = tmp_path / "mask.seg.dcm"
    seg_r = client.get(f"/api/jobs/{status['job_id']}/dicom-seg")
    assert seg_r.headers["content-type"] == "application/dicom"
    seg.write_bytes(seg_r.content)
    from_nifti = read_label_map(nii)
    assert same_geometry(from_nifti, reference)
    from_seg = read_label_map(seg, reference)
    np.testing.assert_array_equal(from_seg.array.astype(bool), from_nifti.array.astype(bool))
    assert from_seg.meta["label_names"] == {1: "liver"}


# --------------------------------------------------------------------------------------------------
# the vision-feature cache


def test_new_prompts_on_the_same_image_reuse_the_vision_features(
    serve_model, data_dir, tmp_path, monkeypatch
):
    from transformers import Sam3Model

    calls = []
    original = Sam3Model.get_vision_features

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sam3Model, "get_vision_features", counting)
    with client_for(make_settings(serve_model, tmp_path / "work")) as c:
        first = upload(c, data_dir / HC18).json()["image_id"]
        a = done(segment(c, first, {"prompts": [{"text": "fetal head"}]}))
        assert len(calls) == 1
        b = done(segment(c, first, {"prompts": [{"text": "skull", "boxes": [[200, 100, 600, 500]]}]}))
        again = segment(c, first, {"prompts": [{"text": "fetal head"}]})
        assert len(calls) == 1  # two more jobs on the same pixels: no encoder run
        assert done(again)["labels"][0]["area_px"] == a["labels"][0]["area_px"]
        assert b["labels"][0]["prompt"]["kind"] == "text+box"
        m1 = c.get(f"/api/jobs/{again['job_id']}/mask").content
        assert np.asarray(PILImage.open(io.BytesIO(m1))).any()

        second = upload(c, data_dir / KVASIR).json()["image_id"]
        done(segment(c, second, {"prompts": [{"text": "polyp"}]}))
        assert len(calls) == 2  # another image: encoded once
        cache = c.get("/api/info").json()["feature_cache"]
        assert cache["encoder_calls"] == 2 and cache["hits"] == 2 and cache["items"] == 2


def test_feature_cache_is_bounded_lru():
    import torch

    from medsam3.serve.cache import FeatureCache, pixel_key

    cache = FeatureCache(max_items=2, max_bytes=10_000)
    a, b, c = (torch.full((1, 3, 4, 4), float(v)) for v in (1, 2, 3))
    assert pixel_key(a) == pixel_key(a.clone()) and pixel_key(a) != pixel_key(b)
    assert pixel_key(a) != pixel_key(a.to(torch.float64))
    for t in (a, b):
        cache.put(pixel_key(t), (t,))
    assert cache.get(pixel_key(a)) is not None  # a is now the most recent
    cache.put(pixel_key(c), (c,))  # evicts b, the least recently used
    assert cache.get(pixel_key(b)) is None and cache.get(pixel_key(a)) is not None
    assert cache.stats.evictions == 1 and len(cache) == 2
    big = torch.zeros(4000)  # 16 000 bytes > max_bytes: returned by the caller but never kept
    cache.put("big", (big,))
    assert cache.get("big") is None and cache.stats.bytes == 2 * 3 * 16 * 4


# --------------------------------------------------------------------------------------------------
# errors


def test_unknown_ids_and_routes_are_json_errors(client):
    for path in (
        "/api/images/" + "0" * 32,
        "/api/jobs/" + "f" * 32,
        "/api/images/not-an-id",
        "/api/jobs/..%2F..%2Fetc",
        "/api/nothing-here",
    ):
        r = client.get(path)
        assert r.status_code == 404, path
        assert set(r.json()) == {"error"} and r.json()["error"]
    r = client.post("/api/images/" + "0" * 32 + "/segment", json={"prompts": [{"text": "liver"}]})
    assert r.status_code == 404 and "unknown image id" in r.json()["error"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": [{}]}, "a prompt needs a text, a box or a point"),
        ({"prompts": [{"text": "   "}]}, "empty text prompt"),
        ({"prompts": [{"text": "x", "boxes": [[10, 10, 5, 20]]}]}, "degenerate"),
        ({"prompts": [{"text": "x", "boxes": [[10, 10, 900, 20]]}]}, "outside"),
        ({"prompts": [{"text": "x", "boxes": [[1, 2, 3]]}]}, "4 numbers"),
        ({"prompts": [{"points": [[5, 5]], "point_labels": [2]}]}, "point label 2"),
        ({"prompts": [{"text": "x"}], "threshold": 1.5}, "threshold"),
        ({"prompts": [{"text": "x"}], "window": "lung"}, "CT only"),
        ({"prompts": [{"text": "x"}], "slice": {"plane": "axial", "index": 0}}, "volumes only"),
        ({"prompts": [{"text": "x"}], "colour": "red"}, "colour"),
        ({"prompts": [{"text": "x"}], "tta": True, "instances": True}, "cannot be combined with instances"),
        (
            {"prompts": [{"text": "x", "points": [[5, 5]]}], "tta": True},
            "cannot be combined with point prompts",
        ),
    ],
)
def test_bad_prompts_are_refused_before_queueing(client, data_dir, body, message):
    image_id = upload(client, data_dir / HC18).json()["image_id"]
    r = client.post(f"/api/images/{image_id}/segment", json=body)
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]


def test_volume_prompt_errors(client, data_dir):
    image_id = upload(client, data_dir / HIPPO).json()["image_id"]
    r = client.post(
        f"/api/images/{image_id}/segment", json={"prompts": [{"text": "x", "boxes": [[1, 1, 5, 5]]}]}
    )
    assert r.status_code == 422 and "need a slice" in r.json()["error"]
    r = client.post(
        f"/api/images/{image_id}/segment",
        json={"prompts": [{"text": "x"}], "slice": {"plane": "axial", "index": 999}},
    )
    assert r.status_code == 400 and "out of range" in r.json()["error"]
    r = client.get(f"/api/images/{image_id}/slices/image/0.png")
    assert r.status_code == 400 and "axial, coronal, sagittal" in r.json()["error"]


def test_unexpected_errors_are_500_json_without_traceback(serve_model, tmp_path):
    with client_for(make_settings(serve_model, tmp_path / "work"), raise_server_exceptions=False) as c:
        service = c.app.state.service

        def boom(*args, **kwargs):
            raise RuntimeError("secret internal detail at /srv/private")

        service.info = boom
        r = c.get("/api/info")
        assert r.status_code == 500
        assert set(r.json()) == {"error"} and "internal server error" in r.json()["error"]
        assert "secret" not in r.text and "Traceback" not in r.text


# --------------------------------------------------------------------------------------------------
# the queue


def test_full_queue_answers_503_with_retry_after(serve_model, data_dir, tmp_path):
    with client_for(make_settings(serve_model, tmp_path / "work", workers=1, queue_size=1)) as c:
        service = c.app.state.service
        gate, started = threading.Event(), threading.Event()
        real = service.queue.execute

        def blocked(job):
            started.set()
            assert gate.wait(30)
            return real(job)

        service.queue.execute = blocked
        image_id = upload(c, data_dir / HC18).json()["image_id"]
        body = {"prompts": [{"text": "fetal head"}]}
        first = c.post(f"/api/images/{image_id}/segment", json=body).json()
        assert started.wait(10)
        second = c.post(f"/api/images/{image_id}/segment", json=body).json()
        assert c.get(f"/api/jobs/{first['job_id']}").json()["status"] == "running"
        waiting = c.get(f"/api/jobs/{second['job_id']}").json()
        assert waiting["status"] == "queued" and waiting["queue_position"] == 1
        r = c.get(f"/api/jobs/{first['job_id']}/mask")
        assert r.status_code == 409 and "running" in r.json()["error"]

        full = c.post(f"/api/images/{image_id}/segment", json=body)
        assert full.status_code == 503
        assert int(full.headers["retry-after"]) >= 1 and "busy" in full.json()["error"]
        assert c.get("/api/info").json()["queue"]["waiting"] == 1

        gate.set()
        assert wait_job(c, first["job_id"])["status"] == "done"
        assert wait_job(c, second["job_id"])["status"] == "done"
        assert c.post(f"/api/images/{image_id}/segment", json=body).status_code == 202


def test_failed_job_reports_the_message(client, data_dir, monkeypatch):
    from medsam3.errors import InputError

    service = client.app.state.service
    image_id = upload(client, data_dir / HC18).json()["image_id"]

    def refuse(job):
        raise InputError(service.work_dir / "images" / job.image_id / "source.png", "cannot be decoded here")

    monkeypatch.setattr(service.queue, "execute", refuse)
    status = segment(client, image_id, {"prompts": [{"text": "x"}]})
    assert status["status"] == "failed" and status["error"] == "000_HC.png: cannot be decoded here"
    r = client.get(f"/api/jobs/{status['job_id']}/mask")
    assert r.status_code == 409 and "cannot be decoded here" in r.json()["error"]


# --------------------------------------------------------------------------------------------------
# token, expiry, documentation, command line


def test_token_protects_every_endpoint(serve_model, data_dir, tmp_path):
    token = "s3cret-token-123"
    with client_for(make_settings(serve_model, tmp_path / "work", token=token)) as c:
        for path in (
            "/api/info",
            "/openapi.json",
            "/docs",
            "/docs-assets/swagger-ui.css",
            "/static/viewer.js",
            "/api/images/" + "0" * 32,
        ):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"].startswith("authentication required")
            assert r.headers["www-authenticate"] == "Bearer"
        assert upload(c, data_dir / HC18).status_code == 401
        page = c.get("/", headers={"Accept": "text/html"}, follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert c.get("/login").status_code == 200
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong-token"}).status_code == 401

        auth = {"Authorization": f"Bearer {token}"}
        assert c.get("/api/info", headers=auth).json()["auth"] is True
        assert c.get("/openapi.json", headers=auth).status_code == 200
        image_id = upload(c, data_dir / HC18, headers=auth).json()["image_id"]
        assert segment(c, image_id, {"prompts": [{"text": "head"}]}, headers=auth)["status"] == "done"

        assert c.post("/api/login", json={"token": "nope-nope"}).status_code == 401
        assert "medsam3_token" not in c.cookies
        assert c.post("/api/login", json={"token": token}).status_code == 200
        assert c.get("/api/info").status_code == 200  # the cookie now carries the token
        c.cookies.clear()
        r = c.get(f"/api/info?token={token}")
        assert r.status_code == 200 and "medsam3_token" in r.headers["set-cookie"]
        assert c.get("/static/viewer.js").status_code == 200


def test_results_and_images_expire(serve_model, data_dir, tmp_path):
    settings = make_settings(serve_model, tmp_path / "work", result_ttl=0.6, cleanup_interval=0.1)
    with client_for(settings) as c:
        image_id = upload(c, data_dir / HC18).json()["image_id"]
        status = segment(c, image_id, {"prompts": [{"text": "head"}]})
        job_folder = c.app.state.service.jobs_dir / status["job_id"]
        image_folder = c.app.state.service.images.root / image_id
        assert (job_folder / "mask.png").is_file() and image_folder.is_dir()
        assert status["expires"] == pytest.approx(status["finished"] + 0.6)
        deadline = time.time() + 10
        while c.get(f"/api/jobs/{status['job_id']}").status_code != 410 and time.time() < deadline:
            time.sleep(0.1)
        r = c.get(f"/api/jobs/{status['job_id']}/mask")
        assert r.status_code == 410 and "expired" in r.json()["error"]
        # an expired job answers 410 at once; its folder goes with the next sweep (every 0.1 s here)
        while job_folder.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert not job_folder.exists()
        while c.get(f"/api/images/{image_id}").status_code != 410 and time.time() < deadline:
            time.sleep(0.1)
        assert c.get(f"/api/images/{image_id}").status_code == 410 and not image_folder.exists()


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    for path in (
        "/api/images",
        "/api/images/{image_id}/segment",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/mask",
        "/api/images/{image_id}/slices/{plane}/{index}.png",
    ):
        assert path in spec["paths"], path
    upload_body = spec["paths"]["/api/images"]["post"]["requestBody"]["content"]
    assert upload_body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert "SegmentIn" in spec["components"]["schemas"]
    docs = client.get("/docs").text
    assert "swagger" in docs.lower() and "/openapi.json" in docs
    # Swagger UI's files come from the package, not from a CDN (the server may have no internet)
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    script = client.get("/docs-assets/swagger-ui-bundle.js")
    assert script.status_code == 200 and "SwaggerUIBundle" in script.text
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "viewer.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]


def test_command_line_settings_and_exposure_warning(monkeypatch):
    from medsam3.cli import build_parser
    from medsam3.commands.serve import exposure_warning, settings_from_args
    from medsam3.serve.settings import SettingsError

    monkeypatch.delenv("MEDSAM3_TOKEN", raising=False)
    args = build_parser().parse_args(
        ["serve", "--workers", "2", "--queue-size", "3", "--result-ttl", "60", "--max-upload-mb", "5"]
    )
    s = settings_from_args(args)
    assert (s.host, s.port, s.workers, s.queue_size, s.result_ttl) == ("127.0.0.1", 8000, 2, 3, 60.0)
    assert s.max_upload_bytes == 5 * 1024 * 1024 and s.token is None
    assert exposure_warning(s) is None

    exposed = settings_from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    warning = exposure_warning(exposed)
    assert "WITHOUT A TOKEN" in warning and "0.0.0.0:8000" in warning
    monkeypatch.setenv("MEDSAM3_TOKEN", "from-the-environment")
    guarded = settings_from_args(build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    assert guarded.token == "from-the-environment" and exposure_warning(guarded) is None
    assert settings_from_args(build_parser().parse_args(["serve", "--host", "::1"])).is_loopback

    with pytest.raises(SettingsError, match="at least 8 characters"):
        settings_from_args(build_parser().parse_args(["serve", "--token", "short"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", "0"])
