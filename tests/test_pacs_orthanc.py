"""PACS round trips against a real Orthanc server (started here, on a free loopback port, and stopped).

* ``medsam3 segment dicomweb+http://.../studies/UID/series/UID --store``: the series is retrieved by
  WADO-RS, segmented, and its DICOM SEG and RTSTRUCT stored by STOW-RS; read back from Orthanc, both
  reference the series and decode to the label map written locally; storing the same result again leaves
  one copy.
* Bad cases, each a clear error with nothing written locally and nothing stored: server down, wrong
  password (401), unknown series, a series mixing slice sizes, a download cut in the middle.
* ``medsam3 watch``: two series are each handled exactly once; killed (SIGKILL) right after the second
  series' results reached the server and restarted, both end stored exactly once.

The model is the tiny random video model of the server tests (it always finds something), so the masks
mean nothing clinically; what is checked is the transport, the references and the decoding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsam3.cli import main
from medsam3.io.dicom_seg import read_seg
from medsam3.io.readers import read_image, read_label_map
from medsam3.io.rtstruct import read_rtstruct
from pacs_servers import PASSWORD, USER, Proxy, Rule, hospital_series, start_orthanc

pytestmark = pytest.mark.needs_data

SAMPLE = "totalsegmentator/example_ct_dicom"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("MEDSAM3_DICOMWEB_USER", USER)
    monkeypatch.setenv("MEDSAM3_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.delenv("MEDSAM3_DICOMWEB_TOKEN", raising=False)


@pytest.fixture(scope="module")
def uploaded(orthanc, data_dir, tmp_path_factory):
    """A hospital-like copy of the sample series on the server: ``(local folder, study UID, series UID)``."""
    folder = hospital_series(data_dir / SAMPLE, tmp_path_factory.mktemp("series") / "ct")
    orthanc.upload(sorted(folder.iterdir()))
    first = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    return folder, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def _url(orthanc, study: str, series: str, base: str | None = None) -> str:
    return f"dicomweb+{base or orthanc.dicomweb}/studies/{study}/series/{series}"


def _derived(orthanc, study: str) -> dict[str, list[dict]]:
    """The SEG and RTSTRUCT series Orthanc holds in ``study``, by modality."""
    found: dict[str, list[dict]] = {"SEG": [], "RTSTRUCT": []}
    for s in orthanc.series_of_study(study):
        modality = s["MainDicomTags"].get("Modality")
        if modality in found:
            found[modality].append(s)
    return found


def _segment(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_by_url_stores_seg_and_rtstruct_that_decode_to_the_local_labels(
    orthanc, uploaded, serve_model, credentials, tmp_path, capsys
):
    folder, study, series = uploaded
    out = tmp_path / "out"
    argv = [
        "segment",
        _url(orthanc, study, series),
        "-p",
        "liver",
        "-p",
        "spleen",
        "-o",
        out,
        "--model",
        serve_model,
        "--device",
        "cpu",
        "--output-type",
        "nifti",
        "dicom-seg",
        "rtstruct",
        "--store",
    ]
    code, stdout, err = _segment(capsys, *argv)
    assert code == 0, err
    assert stdout.count("stored: ") == 2
    labels_path = out / f"{series}_seg.nii.gz"
    local = read_image(folder)
    labels = read_label_map(labels_path, reference=local).array
    assert labels.shape == local.spatial_shape and labels.max() >= 1
    summary = json.loads((out / f"{series}.json").read_text())
    assert summary["image"]["path"] == _url(orthanc, study, series)

    derived = _derived(orthanc, study)
    assert len(derived["SEG"]) == 1 and len(derived["RTSTRUCT"]) == 1
    seg_file = tmp_path / "seg_from_pacs.dcm"
    seg_file.write_bytes(orthanc.instance_file(derived["SEG"][0]["Instances"][0]))
    seg = pydicom.dcmread(seg_file)
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert seg.StudyInstanceUID == study
    from_pacs = read_seg(seg_file, reference=local).label_map()
    assert np.array_equal(from_pacs.array, labels)

    rt_file = tmp_path / "rtstruct_from_pacs.dcm"
    rt_file.write_bytes(orthanc.instance_file(derived["RTSTRUCT"][0]["Instances"][0]))
    rt = pydicom.dcmread(rt_file)
    assert rt.SOPClassUID == RTSTRUCT_CLASS
    referenced = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == series
    listed = {
        item.ReferencedSOPInstanceUID
        for item in referenced.RTReferencedSeriesSequence[0].ContourImageSequence
    }
    assert listed == set(local.meta["sop_instance_uids"])
    structure = read_rtstruct(rt_file, local)
    for value, name in ((1, "liver"), (2, "spleen")):
        assert structure.names[value] == name
        mask, truth = structure.mask(value), labels == value
        dice = 2 * np.sum(mask & truth) / max(mask.sum() + truth.sum(), 1)
        assert dice >= 0.98, (name, dice)

    # the same command again: the same result, the same UIDs: still one SEG and one RTSTRUCT
    code, _, err = _segment(capsys, *argv, "--overwrite")
    assert code == 0, err
    again = _derived(orthanc, study)
    assert [len(again["SEG"]), len(again["RTSTRUCT"])] == [1, 1]

    # --dicomweb ROOT --study --series names the same series: the same label map
    out2 = tmp_path / "out2"
    code, _, err = _segment(
        capsys,
        "segment",
        "--dicomweb",
        orthanc.dicomweb,
        "--study",
        study,
        "--series",
        series,
        "-p",
        "liver",
        "-p",
        "spleen",
        "-o",
        out2,
        "--model",
        serve_model,
        "--device",
        "cpu",
        "--no-overlay",
    )
    assert code == 0, err
    assert np.array_equal(read_label_map(out2 / f"{series}_seg.nii.gz", reference=local).array, labels)


def _mixed_sizes(folder: Path, dest: Path) -> Path:
    """A copy of a series whose last slice is cropped to a different size (stored uncompressed)."""
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    dest.mkdir(parents=True)
    files = sorted(folder.iterdir())[:4]
    series = generate_uid()
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if i == len(files) - 1:
            pixels = ds.pixel_array[:256, :256].copy()
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelData = pixels.tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(dest / f"{i}.dcm", enforce_file_format=True)
    return dest


@pytest.mark.parametrize("case", ["server down", "wrong password", "unknown series", "mixed sizes", "cut"])
def test_bad_remote_series_are_clear_errors_with_nothing_written_or_stored(
    case, orthanc, uploaded, serve_model, credentials, tmp_path, capsys, monkeypatch
):
    folder, study, series = uploaded
    url = _url(orthanc, study, series)
    expected = {
        "server down": "cannot be reached",
        "wrong password": "refused the credentials (HTTP 401)",
        "unknown series": "not on the server",
        "mixed sizes": "different orientation or size",
        "cut": "the connection broke in the middle of the answer",
    }[case]
    proxy = None
    if case == "server down":
        from pacs_servers import free_port

        url = _url(orthanc, study, series, base=f"http://127.0.0.1:{free_port()}/dicom-web")
    elif case == "wrong password":
        monkeypatch.setenv("MEDSAM3_DICOMWEB_PASSWORD", "not-the-password")
    elif case == "unknown series":
        url = _url(orthanc, study, "1.2.826.0.1.3680043.8.498.1")
    elif case == "mixed sizes":
        mixed = _mixed_sizes(folder, tmp_path / "mixed")
        orthanc.upload(sorted(mixed.iterdir()))
        url = _url(orthanc, study, str(pydicom.dcmread(next(mixed.iterdir())).SeriesInstanceUID))
    else:
        proxy = Proxy(orthanc.url)
        proxy.rules.append(Rule("GET", f"/series/{series}", cut_after=700_000))
        url = _url(orthanc, study, series, base=proxy.url + "/dicom-web")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    before = _derived(orthanc, study)
    out = tmp_path / "out"
    try:
        code, _, err = _segment(
            capsys,
            "segment",
            url,
            "-p",
            "liver",
            "-o",
            out,
            "--model",
            serve_model,
            "--device",
            "cpu",
            "--store",
        )
    finally:
        if proxy is not None:
            proxy.stop()
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())
    assert not any((tmp_path / "tmp").iterdir())  # the download folder is gone
    after = _derived(orthanc, study)
    assert [len(after[k]) for k in after] == [len(before[k]) for k in before]


def _watch(orthanc_url: str, model: Path, out: Path, *extra: str, once: bool = True) -> subprocess.Popen:
    env = dict(os.environ, MEDSAM3_DICOMWEB_USER=USER, MEDSAM3_DICOMWEB_PASSWORD=PASSWORD)
    argv = [sys.executable, "-m", "medsam3", "watch", orthanc_url, "-p", "liver", "-o", str(out)]
    argv += ["--model", str(model), "--device", "cpu", "--poll", "0.5", "--retry-delay", "1", *extra]
    argv += ["--once"] if once else []
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"the watcher did not finish:\n{output}") from None
    assert process.returncode == 0, output
    return output


def _two_series(orthanc, data_dir, tmp_path, tag: str) -> list[tuple[str, str]]:
    pairs = []
    for i in (1, 2):
        folder = hospital_series(data_dir / SAMPLE, tmp_path / f"{tag}{i}", description=f"{tag} {i}", n=8)
        orthanc.upload(sorted(folder.iterdir()))
        ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
        pairs.append((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
    orthanc.wait_stable()
    return pairs


def _seg_counts(orthanc, pairs) -> list[int]:
    return [len(_derived(orthanc, study)["SEG"]) for study, _ in pairs]


def test_watch_segments_each_selected_series_exactly_once(orthanc, data_dir, serve_model, tmp_path):
    pairs = _two_series(orthanc, data_dir, tmp_path, "watchonce")
    out = tmp_path / "out"
    output = _finish(_watch(orthanc.url, serve_model, out, "--select", "SeriesDescription=watchonce*"))
    for _, series in pairs:
        assert output.count(f"segmenting {series}") == 1, output
        assert output.count(f"done {series}") == 1, output
        assert (out / f"{series}_seg.dcm").exists()
    assert _seg_counts(orthanc, pairs) == [1, 1]
    again = _finish(_watch(orthanc.url, serve_model, out, "--select", "SeriesDescription=watchonce*"))
    assert "segmenting" not in again, again
    assert _seg_counts(orthanc, pairs) == [1, 1]


def test_watch_killed_after_storing_the_second_series_ends_with_each_stored_once(
    orthanc, data_dir, serve_model, tmp_path
):
    pairs = _two_series(orthanc, data_dir, tmp_path, "watchkill")
    (study1, series1), (study2, series2) = pairs
    out = tmp_path / "out"
    proxy = Proxy(orthanc.url)
    hold = Rule("POST", f"/dicom-web/studies/{study2}", hold=True)
    proxy.rules.append(hold)
    select = ("--select", "SeriesDescription=watchkill*")
    try:
        first = _watch(proxy.url, serve_model, out, *select, once=False)
        try:
            assert hold.seen.wait(timeout=300), "the watcher never stored the second series"
            # the STOW-RS request reached Orthanc, which stored the SEG; the answer is held: kill now
            assert _seg_counts(orthanc, pairs) == [1, 1]
            os.kill(first.pid, signal.SIGKILL)
            output, _ = first.communicate(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    finally:
        proxy.stop()
    assert f"done {series1}" in output and f"done {series2}" not in output, output
    restarted = _finish(_watch(orthanc.url, serve_model, out, *select))
    assert f"requeued {series2}" in restarted, restarted
    assert f"segmenting {series1}" not in restarted, restarted
    assert restarted.count(f"done {series2}") == 1, restarted
    assert _seg_counts(orthanc, pairs) == [1, 1]
    status = subprocess.run(
        [sys.executable, "-m", "medsam3", "watch", orthanc.url, "-o", str(out), "--status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "2 done" in status.stdout, status.stdout
