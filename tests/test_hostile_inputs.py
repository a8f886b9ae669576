"""Hostile inputs and faults, part one: write-side errors, long names, decompression bombs, truncated NIfTI,
non-finite options, huge and control-character prompts, SIGTERM and SIGKILL in folder mode.

Every input is made here. Each case asserts the exact outcome: the exit status and a one-line ``error:``
naming the path, or the HTTP status; no traceback; no partial output; the input unchanged.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medsam3
from medsam3.cli import main
from medsam3.errors import InputError, OptionError, OutputError
from medsam3.io.atomic import atomic_path, remove_stale_temporaries, temporary_name_parts
from medsam3.io.readers import read_image
from medsam3.predict.options import VolumeOptions
from medsam3.predict.prompts import Prompt

HC18 = Path(medsam3.__file__).parent / "assets" / "samples" / "hc18_400_HC.png"


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def last_error(err: str) -> str:
    return [line for line in err.splitlines() if "error: " in line][-1]


def no_temporaries(folder: Path) -> bool:
    return not any(".part" in p.name for p in folder.rglob("*"))


# -- write side ----------------------------------------------------------------------------------------
def test_a_240_character_input_name_is_segmented(tmp_path, capsys):
    source = tmp_path / ("a" * 240 + ".png")
    shutil.copy(HC18, source)
    before = source.read_bytes()
    out = tmp_path / "out"
    code, err = run(capsys, "segment", source, "-p", "fetal head", "-o", out, "--device", "cpu")
    assert code == 0, err
    assert {p.suffix for p in out.iterdir()} == {".png", ".json"} and len(list(out.iterdir())) == 3
    assert no_temporaries(out) and source.read_bytes() == before
    prefix, suffix = temporary_name_parts(source.name)
    assert len((prefix + "x" * 16 + suffix).encode()) < 80


@pytest.mark.parametrize("kind", ["under a file", "name too long"])
def test_unwritable_output_folders(tmp_path, capsys, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "out" if kind == "under a file" else tmp_path / ("o" * 300)
    code, err = run(capsys, "segment", HC18, "-p", "fetal head", "-o", out, "--device", "cpu")
    if kind == "under a file":  # found when the first output is written
        expected = f"error: {out / 'hc18_400_HC_mask.png'}: cannot write (Not a directory)"
    else:  # found before the model is loaded
        expected = f"error: {out}: cannot write (File name too long)"
    assert code == 2 and last_error(err) == expected
    assert blocker.read_text() == "not a folder" and no_temporaries(tmp_path)


def test_disk_full_and_safetensors_errors_become_write_errors(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(OutputError, match=r"x\.bin: cannot write \(No space left on device\)$"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class SafetensorError(Exception):  # the name safetensors gives its write failures
        pass

    with pytest.raises(OutputError, match=r"cannot write \(File too large\)$"):
        with atomic_path(target) as tmp:
            raise SafetensorError("File too large")
    with pytest.raises(FileNotFoundError):  # not a refused write: passed on as it is
        with atomic_path(target) as tmp:
            raise FileNotFoundError(errno.ENOENT, "source vanished")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".case.{dead_pid}-abc123.part.nii.gz"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f".model.{dead_pid}-k9.part"
    stale_dir.mkdir()
    live = tmp_path / f".case.{os.getpid()}-def456.part.png"
    live.write_bytes(b"mine")
    other = tmp_path / ".hidden.part.txt"
    other.write_bytes(b"not ours")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, stale_dir])
    assert live.exists() and other.exists()


# -- read side -----------------------------------------------------------------------------------------
def _png_declaring(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
    return path


def test_picture_decompression_bomb_is_refused_with_its_size(tmp_path, capsys):
    bomb = _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    code, err = run(capsys, "info", bomb)
    line = last_error(err)
    assert code == 2 and line.startswith(f"error: {bomb}: the picture is refused as a decompression bomb")
    assert "10000000000 pixels" in line
    code, err = run(capsys, "segment", bomb, "-p", "x", "-o", tmp_path / "out")
    assert code == 2 and "decompression bomb" in last_error(err) and not (tmp_path / "out").exists()


def test_picture_decompression_bomb_upload_gets_413(tmp_path, serve_model):
    from serve_fixtures import client_for, make_settings, upload

    bomb = _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)
    with client_for(make_settings(serve_model, tmp_path / "work")) as client:
        r = upload(client, bomb)
        assert r.status_code == 413 and "decompression bomb" in r.json()["error"]
        assert client.get("/api/info").status_code == 200  # the server goes on


@pytest.mark.parametrize("missing", [1, 100, 351])
def test_a_truncated_nifti_is_refused_whatever_is_missing(tmp_path, missing):
    path = tmp_path / "t.nii"
    nib.save(nib.Nifti1Image(np.arange(8 * 9 * 10, dtype=np.int16).reshape(8, 9, 10), np.eye(4)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-missing])
    with pytest.raises(InputError, match=r"is truncated: it holds \d+ bytes but its header needs"):
        read_image(path)


# -- options and prompts -------------------------------------------------------------------------------------
def test_non_finite_options_are_refused(tmp_path, capsys):
    with pytest.raises(OptionError, match="min_component_ml must be a finite number, got nan"):
        VolumeOptions(min_component_ml=float("nan"))
    code, err = run(capsys, "segment", HC18, "-p", "x", "--threshold", "inf", "-o", tmp_path / "o")
    assert code == 2 and "threshold must be a finite number, got inf" in last_error(err)


def test_huge_and_control_character_prompts(tmp_path, capsys):
    assert Prompt("live\x1b[2Jr").text == "live[2Jr"  # the escape character is dropped, never printed
    assert Prompt("fetal\x00 head\x07").text == "fetal head"
    code, err = run(capsys, "segment", HC18, "-p", "x" * 10_000, "-o", tmp_path / "o", "--device", "cpu")
    line = last_error(err)
    assert code == 2 and "(10000 characters) is too long" in line and len(line) < 200


# -- SIGTERM and SIGKILL in folder mode ----------------------------------------------------------------------
def _folder_run(cases: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medsam3.cli",
            "segment",
            str(cases),
            "-p",
            "fetal head",
            "-o",
            str(out),
            "--device",
            "cpu",
            "--no-overlay",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*_mask.png"))}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_folder_run_resumes_to_identical_outputs(tmp_path, sig):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(8):
        shutil.copy(HC18, cases / f"case{i}.png")
    reference = tmp_path / "reference"
    done = _folder_run(cases, reference)
    assert done.wait(timeout=300) == 0, done.stderr.read()

    out = tmp_path / "out"
    proc = _folder_run(cases, out)
    deadline = time.time() + 240
    while not list(out.glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in proc.stderr.read()
        assert "interrupted" in (out / "summary.csv").read_text()
        assert no_temporaries(out)
    else:
        assert code == -signal.SIGKILL
        (out / f".case7_mask.{proc.pid}-zz.part.png").write_bytes(b"half")  # what a kill mid-write leaves
    again = _folder_run(cases, out)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    assert no_temporaries(out)
    assert _outputs(out) == _outputs(reference) and len(_outputs(out)) == 8


# -- valid but unusual arrays, bad auxiliary files ---------------------------------------------------------
def test_huge_float_values_are_not_label_values(tmp_path, capsys):
    path = tmp_path / "huge.nii.gz"
    data = (np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) * 1e30).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    assert run(capsys, "info", path)[0] == 0  # an image: fine
    code, err = run(capsys, "info", "--labels", path)
    assert code == 2 and last_error(err).startswith(
        f"error: {path}: holds values up to 1.19e+32; label values go up to"
    )


def test_a_boolean_array_is_a_0_1_image(tmp_path, capsys):
    path = tmp_path / "mask.npz"
    mask = np.zeros((3, 8, 8), bool)
    mask[1, 2:5, 2:6] = True
    np.savez(path, imgs=mask)
    image = read_image(path)
    assert image.array.dtype == np.uint8 and int(image.array.sum()) == 12
    assert run(capsys, "info", path)[0] == 0


def test_convert_refuses_files_that_are_not_checkpoints(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello world\n" * 10)
    code, err = run(capsys, "convert", text, tmp_path / "m1")
    assert code == 2 and last_error(err) == (
        f"error: {text}: cannot read this checkpoint; the file is not a PyTorch checkpoint (KeyError: 101)"
    )
    packed = tmp_path / "packed.pt"
    import gzip

    with gzip.open(packed, "wb") as fh:
        fh.write(b"hello")
    code, err = run(capsys, "convert", packed, tmp_path / "m2")
    assert code == 2 and "is gzip-compressed, not a PyTorch checkpoint" in last_error(err)
    assert "run code" not in err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def _coco_folder(root: Path) -> Path:
    import json

    from PIL import Image as PILImage

    (root / "images").mkdir(parents=True)
    PILImage.fromarray(np.zeros((20, 30), np.uint8)).save(root / "images" / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 30}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[2, 2, 12, 2, 12, 9, 2, 9]],
            }
        ],
        "categories": [{"id": 1, "name": "cell"}],
    }
    path = root.parent / "elsewhere.json"
    path.write_text(json.dumps(doc))
    return path


def test_prepare_bad_label_names_and_absolute_annotation_paths(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text('{"polyp": 1, "huge": 1e400}')
    root = tmp_path / "coco"
    annotations = _coco_folder(root)
    code, err = run(
        capsys,
        "prepare",
        "--layout",
        "coco",
        "--root",
        root,
        "--annotations",
        annotations,
        "--labels",
        labels,
        "-o",
        tmp_path / "m.jsonl",
    )
    assert code == 2 and "label entry 'huge': inf is not a value/name pair" in last_error(err)
    code, err = run(
        capsys,
        "prepare",
        "--layout",
        "coco",
        "--root",
        root,
        "--annotations",
        annotations,
        "-o",
        tmp_path / "m.jsonl",
    )
    assert code == 0, err
    assert "cell" in (tmp_path / "m.jsonl").read_text()


# -- a segmentation given as the image to segment -----------------------------------------------------------
def _segmentation_file(tmp_path: Path) -> Path:
    from medsam3.image import Image
    from medsam3.io.writers import write_label_map

    reference = Image.from_array(np.zeros((4, 16, 16), np.int16), spacing=(1.0, 1.0, 2.0), modality="CT")
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1:3, 4:9, 5:11] = 1
    return write_label_map(labels, tmp_path / "organs.seg.nrrd", reference, {1: "liver"})


def test_a_segmentation_is_refused_as_input_everywhere(tmp_path, capsys, serve_model, data_dir):
    from medsam3.io.readers import NOT_AN_IMAGE
    from serve_fixtures import client_for, make_settings, upload

    for path in (
        _segmentation_file(tmp_path),
        data_dir / "dcmqi_ct3slice" / "liver.dcm",
    ):  # Slicer, DICOM SEG
        code, err = run(
            capsys, "segment", path, "-p", "liver", "-o", tmp_path / "out", "--model", serve_model
        )
        assert code == 2 and last_error(err) == f"error: {path}: {NOT_AN_IMAGE}"
        assert not (tmp_path / "out").exists()
        with pytest.raises(InputError, match=re.escape(NOT_AN_IMAGE)):
            medsam3.Segmenter(serve_model, device="cpu").segment(path, "liver")
        with client_for(make_settings(serve_model, tmp_path / "work")) as client:
            r = upload(client, path)
            assert r.status_code == 400 and r.json()["error"] == f"{path.name}: {NOT_AN_IMAGE}"


def test_outputs_inside_the_folder_of_cases(tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(HC18, cases / name)
    before = {p.name: p.read_bytes() for p in cases.iterdir()}
    for _ in range(2):  # the second run finds the outputs of the first, not new cases
        code, err = run(capsys, "segment", cases, "-p", "fetal head", "-o", cases / "out", "--device", "cpu")
        assert code == 0, err
    assert sorted(p.name for p in (cases / "out").glob("*_mask.png")) == ["a_mask.png", "b_mask.png"]
    assert {p.name: p.read_bytes() for p in cases.iterdir() if p.is_file()} == before
    code, err = run(capsys, "segment", cases, "-p", "fetal head", "-o", cases / "a.png", "--device", "cpu")
    assert code == 2 and "output folder is an existing file" in last_error(err)


def test_a_sheared_nifti_is_refused_not_silently_straightened(tmp_path, capsys):
    path = tmp_path / "sheared.nii.gz"
    affine = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 5), np.int16), affine), str(path))
    code, err = run(capsys, "segment", path, "-p", "liver", "-o", tmp_path / "out")
    line = last_error(err)
    assert code == 2 and line.startswith(f"error: {path}: has a sheared (non-orthogonal) voxel grid")
    assert "Resample it to an orthogonal grid first" in line and not (tmp_path / "out").exists()
    rounded = tmp_path / "rounded.nii.gz"  # float rounding in an sform is not a shear
    nib.save(
        nib.Nifti1Image(np.zeros((10, 12, 5), np.int16), np.diag([1.0, 1.0, 2.0, 1.0]) + 1e-7), str(rounded)
    )
    assert read_image(rounded).array.shape == (5, 12, 10)


# -- the server protects its host: Host and Origin ----------------------------------------------------------
def test_host_rules_by_hand():
    from medsam3.serve.settings import ServeSettings

    local = ServeSettings()
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "LOCALHOST:80", "viewer.localhost:8000"):
        assert local.host_allowed(host), host
    for host in ("evil.example:8000", "", None, "127.0.0.1.evil.example"):
        assert not local.host_allowed(host), host
    named = ServeSettings(allowed_hosts=("imaging.lab.example",))
    assert named.host_allowed("imaging.lab.example:8000") and not named.host_allowed("other.example")
    assert ServeSettings(host="0.0.0.0").host_allowed("any.example")  # every interface: a token protects it
    assert not ServeSettings(host="0.0.0.0", allowed_hosts=("a.example",)).host_allowed("b.example")


def test_rebinding_hosts_and_cross_origin_writes_are_refused(tmp_path, serve_model):
    from serve_fixtures import client_for, make_settings

    with client_for(make_settings(serve_model, tmp_path / "work", allowed_hosts=())) as client:
        r = client.get("/api/info", headers={"Host": "attacker.example"})
        assert r.status_code == 400 and "unknown Host 'attacker.example'" in r.json()["error"]
        assert client.get("/api/info", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        png = HC18.read_bytes()
        files = {"file": ("a.png", png)}
        r = client.post(
            "/api/images",
            files=files,
            headers={"Host": "127.0.0.1:8000", "Origin": "http://attacker.example"},
        )
        assert (
            r.status_code == 403 and "cross-origin request from http://attacker.example" in r.json()["error"]
        )
        r = client.post(
            "/api/images", files=files, headers={"Host": "127.0.0.1:8000", "Origin": "http://127.0.0.1:8000"}
        )
        assert r.status_code == 201  # the viewer's own page
        r = client.post("/api/images", files=files, headers={"Host": "127.0.0.1:8000"})
        assert r.status_code == 201  # scripts send no Origin


def test_failed_logins_are_throttled_per_client():
    from medsam3.serve.throttle import FailureThrottle

    t = FailureThrottle(limit=3, window=10.0)
    for k in range(3):
        assert t.wait("a", now=100.0 + k) == 0.0
        t.failed("a", now=100.0 + k)
    assert t.wait("a", now=103.0) == pytest.approx(7.0)  # until the first failure is 10 s old
    assert t.wait("b", now=103.0) == 0.0  # another client is not affected
    assert t.wait("a", now=110.5) == 0.0


def test_wrong_tokens_get_429_after_ten(tmp_path, serve_model):
    from serve_fixtures import client_for, make_settings

    token = "a-long-enough-token"
    with client_for(make_settings(serve_model, tmp_path / "work", token=token)) as client:
        codes = [client.post("/api/login", json={"token": f"wrong-{k:04d}"}).status_code for k in range(10)]
        assert codes == [401] * 10
        r = client.get("/api/info", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        assert "too many failed authentication attempts" in r.json()["error"]


def test_an_image_with_a_queued_job_is_not_deleted(tmp_path, serve_model, monkeypatch):
    import threading

    from medsam3.serve.service import Service
    from serve_fixtures import client_for, make_settings, upload, wait_job

    gate = threading.Event()
    real = Service.execute

    def held(self, job):
        gate.wait(30)
        return real(self, job)

    monkeypatch.setattr(Service, "execute", held)
    with client_for(make_settings(serve_model, tmp_path / "work")) as client:
        image_id = upload(client, HC18).json()["image_id"]
        job = client.post(f"/api/images/{image_id}/segment", json={"prompts": [{"text": "head"}]}).json()
        r = client.delete(f"/api/images/{image_id}")
        assert r.status_code == 409 and "1 job(s) queued or running" in r.json()["error"]
        gate.set()
        assert wait_job(client, job["job_id"])["status"] == "done"
        assert client.delete(f"/api/images/{image_id}").status_code == 200


# -- declared sizes before allocation ---------------------------------------------------------------------
def _nrrd(path: Path, sizes: str, encoding: str, data: bytes) -> Path:
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {sizes}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: {encoding}\n"
        "space origin: (0,0,0)\n\n"
    )
    path.write_bytes(header.encode() + data)
    return path


def test_a_voxel_bomb_is_refused_before_allocation(tmp_path, capsys, monkeypatch):
    bomb = _nrrd(tmp_path / "bomb.nrrd", "2000 2000 2000", "gzip", zlib.compress(b"\0" * 64))
    assert bomb.stat().st_size < 400
    code, err = run(capsys, "info", bomb)
    assert code == 2 and last_error(err) == (
        f"error: {bomb}: declares 2000 x 2000 x 2000 = 8,000,000,000 voxels, more than the limit of "
        "1,073,741,824 (set MEDSAM3_MAX_VOXELS to read larger volumes)"
    )
    short = _nrrd(tmp_path / "short.nrrd", "10 10 10", "raw", b"\0" * 100)
    code, err = run(capsys, "info", short)
    assert code == 2 and "is truncated: its header declares 2,000 bytes of raw voxels" in last_error(err)
    monkeypatch.setenv("MEDSAM3_MAX_VOXELS", "500")
    whole = _nrrd(tmp_path / "whole.nrrd", "10 10 10", "raw", b"\0" * 2000)
    code, err = run(capsys, "info", whole)
    assert code == 2 and "declares 10 x 10 x 10 = 1,000 voxels, more than the limit of 500" in last_error(err)
    monkeypatch.delenv("MEDSAM3_MAX_VOXELS")
    assert run(capsys, "info", whole)[0] == 0


def test_nifti_header_voxel_sizes_and_names(tmp_path, capsys):
    path = tmp_path / "pix.nii"
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 5), np.int16), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[80:88] = struct.pack("<ff", 0.0, -1.0)  # pixdim[1], pixdim[2] of a NIfTI-1 header
    path.write_bytes(bytes(raw))
    code, err = run(capsys, "info", path)
    assert code == 2 and last_error(err) == (
        f"error: {path}: has invalid voxel sizes in its header (pixdim [0.0, -1.0, 1.0]); "
        "they must be positive"
    )
    plain = tmp_path / "plain.nii.gz"
    nib.save(
        nib.Nifti1Image(np.arange(600, dtype=np.int16).reshape(10, 12, 5), np.diag([0.5, 0.7, 2.0, 1])),
        str(plain),
    )
    bare = tmp_path / "scan_without_extension"
    shutil.copy(plain, bare)  # recognised by its content, as the server does
    a, b = read_image(plain), read_image(bare)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.spacing == b.spacing and b.meta["path"] == str(bare)
    assert run(capsys, "info", bare)[0] == 0


def test_retry_after_is_estimated_from_measured_jobs_only():
    from medsam3.serve.jobs import JobQueue

    queue = JobQueue(lambda job: {}, lambda job, exc: str(exc), workers=1, queue_size=16)
    try:
        queue._waiting.extend(f"j{k}" for k in range(16))  # a full queue, before any job has finished
        assert queue.retry_after() == 1
        queue._durations.extend([0.1, 0.1, 0.1])
        assert queue.retry_after() == 2  # ceil(0.1 s x 16 ahead)
    finally:
        queue._waiting.clear()
        queue.shutdown()


def test_an_npz_upload_is_named_for_what_it_is(tmp_path, serve_model):
    from serve_fixtures import client_for, make_settings, upload

    path = tmp_path / "case.npz"
    np.savez_compressed(path, imgs=np.zeros((3, 8, 8), np.uint8))
    with client_for(make_settings(serve_model, tmp_path / "work")) as client:
        r = upload(client, path)
    assert r.status_code == 415 and r.json()["error"].startswith("case.npz: a numpy .npz archive")
    assert "DICOM folder" not in r.json()["error"]


def test_a_failed_report_leaves_no_empty_folder(tmp_path):
    from medsam3.evaluate.report import write_files

    def full_disk(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "reports" / "run1"
    with pytest.raises(OutputError, match=r"cases\.csv: cannot write \(No space left on device\)"):
        write_files(out, {"summary.csv": "a,b\n", "figures/x.png": b"png", "cases.csv": full_disk})
    assert list(tmp_path.iterdir()) == []  # reports/, run1/ and figures/ were made for it: all gone
    (tmp_path / "kept").mkdir()
    with pytest.raises(OutputError):
        write_files(tmp_path / "kept", {"cases.csv": full_disk})
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays


def test_serve_with_an_unwritable_work_dir(tmp_path, capsys, serve_model):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    work = blocker / "work"
    code, err = run(
        capsys, "serve", "--work-dir", work, "--model", serve_model, "--device", "cpu", "--port", "0"
    )
    assert code == 2 and last_error(err) == f"error: {work}: cannot write (Not a directory)"


# -- what survives a server restart --------------------------------------------------------------------------
def _held_service(settings, loaded, gate):
    from medsam3.serve.service import Service

    service = Service(settings, loaded)
    real = service.queue.execute

    def held(job):
        gate.wait()  # a server killed while this job runs: the (daemon) thread never comes back
        return real(job)

    service.queue.execute = held
    return service


def test_a_restarted_server_knows_its_images_and_runs_every_job_it_accepted(tmp_path, serve_model):
    import threading

    from medsam3.model.loading import load_sam3
    from medsam3.serve.schemas import SegmentIn
    from medsam3.serve.service import Service
    from medsam3.serve.uploads import Received
    from serve_fixtures import make_settings

    settings = make_settings(serve_model, tmp_path / "work", workers=1, queue_size=8, result_ttl=3600.0)
    loaded = load_sam3(serve_model, device="cpu", dtype="fp32")
    gate = threading.Event()
    old = _held_service(settings, loaded, gate)
    image_id = "ab" * 16
    folder = old.images.new_folder(image_id)
    shutil.copy(HC18, folder / "upload.part")
    size = (folder / "upload.part").stat().st_size
    rec = old._read_upload(image_id, folder, Received(folder / "upload.part", "head.png", size))
    body = SegmentIn.model_validate({"prompts": [{"text": "head"}]})
    jobs = [old.submit(rec.id, body) for _ in range(3)]
    deadline = time.time() + 30
    while jobs[0].status != "running" and time.time() < deadline:
        time.sleep(0.02)
    assert [j.status for j in jobs] == ["running", "queued", "queued"]
    (old.jobs_dir / jobs[0].id).mkdir()  # the partial folder of the job that was cut short
    stray = old.jobs_dir / ("cd" * 16)
    stray.mkdir()  # a folder no record knows, older than the results' lifetime
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    # the old server is killed here: no shutdown, its worker stays blocked

    new = Service(settings, loaded)
    try:
        assert new.images.get(image_id).name == "head.png"
        for job in jobs:
            got = new.get_job(job.id)
            deadline = time.time() + 60
            while not got.ended and time.time() < deadline:
                time.sleep(0.05)
            assert got.status == "done", got.error
            assert new.job_file(got, "mask").is_file()
        assert not stray.exists()
        # after the results' lifetime everything of the old run is gone: the disk is back to the state file
        assert new.cleanup(now=time.time() + settings.result_ttl + 1) == {"jobs": 3, "images": 1}
        assert not any(p.is_file() for p in (old.work_dir / "images").rglob("*"))
        assert not any(p.is_file() for p in old.jobs_dir.rglob("*"))
        assert new.state.jobs() == [] and new.state.images() == []
    finally:
        new.close()


def _serve(work: Path, model: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    cmd = [
        sys.executable,
        "-m",
        "medsam3.cli",
        "serve",
        "--work-dir",
        str(work),
        "--port",
        str(port),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--queue-size",
        "32",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_up(client, proc: subprocess.Popen) -> None:
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if client.get("/api/info").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not start")


def test_server_killed_with_jobs_queued_answers_for_every_job_after_a_restart(tmp_path, serve_model):
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = tmp_path / "work"
    hippo = Path(medsam3.__file__).parent / "assets" / "samples" / "hippocampus_019.nii.gz"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        server = _serve(work, serve_model, port)
        try:
            _wait_up(client, server)
            with open(hippo, "rb") as fh:
                image_id = client.post("/api/images", files={"file": (hippo.name, fh)}).json()["image_id"]
            body = {"prompts": [{"text": "hippocampus"}, {"text": "liver"}]}
            ids = [
                client.post(f"/api/images/{image_id}/segment", json=body).json()["job_id"] for _ in range(8)
            ]
            server.kill()  # SIGKILL, with jobs queued and one running
            server.wait(30)
            from medsam3.serve.durable import StateStore

            recorded = StateStore(work)
            unfinished = [j.status for j in recorded.jobs() if not j.ended]
            recorded.close()
            assert unfinished and set(unfinished) <= {"queued", "running"}
            states = []
            server = _serve(work, serve_model, port)
            _wait_up(client, server)
            for job_id in ids:
                deadline = time.time() + 240
                while True:
                    r = client.get(f"/api/jobs/{job_id}")
                    assert r.status_code == 200, r.text  # never forgotten
                    if r.json()["status"] in ("done", "failed") or time.time() > deadline:
                        break
                    time.sleep(0.1)
                states.append(r.json()["status"])
            assert states == ["done"] * len(ids)
            assert client.get(f"/api/jobs/{ids[-1]}/mask").status_code == 200
        finally:
            server.terminate()
            server.wait(30)


def test_uploads_stay_within_the_storage_budget(tmp_path, serve_model):
    from serve_fixtures import client_for, make_settings, upload

    with client_for(make_settings(serve_model, tmp_path / "probe")) as client:
        empty = client.app.state.service.storage_bytes()
        upload(client, HC18)
        per_image = client.app.state.service.storage_bytes() - empty  # the upload and its display copy
    budget_mb = (empty + 2.5 * per_image) / 2**20
    settings = make_settings(serve_model, tmp_path / "work", max_storage_mb=budget_mb)
    with client_for(settings) as client:
        service = client.app.state.service
        ids = [upload(client, HC18).json()["image_id"] for _ in range(5)]
        assert service.storage_bytes() <= settings.max_storage_bytes
        assert client.get(f"/api/images/{ids[0]}").status_code == 410  # the oldest idle ones expired
        assert client.get(f"/api/images/{ids[-1]}").status_code == 200
    small = make_settings(serve_model, tmp_path / "work2", max_storage_mb=(empty + per_image / 2) / 2**20)
    with client_for(small) as client:
        r = upload(client, HC18)
        assert r.status_code == 507 and "not enough storage for this upload" in r.json()["error"]
        assert client.app.state.service.images.records() == []


def test_an_npz_declaring_a_huge_array_is_refused_before_allocation(tmp_path, capsys):
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<i2", "fortran_order": False, "shape": (2000, 2000, 2000)}
    )
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("imgs.npy", header.getvalue() + b"\0" * 64)
    code, err = run(capsys, "info", path)
    assert code == 2 and last_error(err) == (
        f"error: {path}: array 'imgs' declares shape (2000, 2000, 2000) = 8,000,000,000 values, "
        "more than the limit of 1,073,741,824 (set MEDSAM3_MAX_VOXELS to read larger volumes)"
    )


def test_a_model_folder_that_cannot_be_written_leaves_nothing(tmp_path):
    from medsam3.model.loading import atomic_directory

    with pytest.raises(OutputError, match=r"model: cannot write \(No space left on device\)$"):
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    with pytest.raises(OutputError, match="cannot write"):
        with atomic_directory(blocker / "model"):
            pass
