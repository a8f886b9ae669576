"""Many cases: discovery, resuming after deletions and interrupts, failures that do not stop the run.

Two levels: the case loop with a fake segmentation (hand-checkable statuses, CSV rows and resumption), and
``medsam3 segment FOLDER`` / ``LIST`` end to end with a tiny random SAM3 on real volumes.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from medsam3.cli import main
from medsam3.errors import InputError
from medsam3.predict.batch_cases import (
    Case,
    discover_cases,
    existing_summary,
    is_batch_input,
    run_cases,
    summary_prompts,
)

GOOD = "msd_hippocampus/images/hippocampus_015.nii.gz"  # MR, 28 slices
SERIES = "dcmqi_ct3slice/ct-3slice"  # CT DICOM series, 3 slices


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------------
# the case loop with a fake segmentation


def fake_segmenter(out_dir: Path, calls: list, fail: set = frozenset(), interrupt: set = frozenset()):
    """Writes ``<name>_seg.nii.gz`` then ``<name>.json`` (listing it), as the real writer does."""

    def segment(case: Case) -> dict:
        calls.append(case.name)
        if case.name in interrupt:
            raise KeyboardInterrupt
        if case.name in fail:
            raise InputError(case.path, "is broken")
        (out_dir / f"{case.name}_seg.nii.gz").write_bytes(b"x")
        summary = {
            "labels": [
                {
                    "value": 1,
                    "name": "liver",
                    "prompt_index": 0,
                    "prompt": {"text": "liver", "kind": "text"},
                    "voxels": 7,
                    "volume_ml": 0.5,
                }
            ],
            "outputs": {"labels": f"{case.name}_seg.nii.gz"},
        }
        (out_dir / f"{case.name}.json").write_text(json.dumps(summary))
        return summary

    return segment


def same(summary):
    return summary_prompts(summary) == [{"text": "liver", "kind": "text"}]


def test_loop_resumes_after_an_interrupt_and_a_deletion(tmp_path):
    cases = [Case(n, tmp_path / f"{n}.nii.gz") for n in ("a", "b", "c", "d")]
    out = tmp_path / "out"
    out.mkdir()
    calls: list[str] = []
    kw = dict(same_prompts=same, label_names=["liver"], show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_cases(cases, fake_segmenter(out, calls, fail={"b"}, interrupt={"c"}), out, **kw)
    assert calls == ["a", "b", "c"]
    rows = read_csv(out / "summary.csv")
    assert [(r["case"], r["status"]) for r in rows] == [("a", "ok"), ("b", "failed"), ("c", "interrupted")]
    assert rows[0]["liver voxels"] == "7" and rows[0]["liver ml"] == "0.5"
    assert rows[1]["error"].endswith("is broken")

    calls.clear()  # re-run: a is done, b failed before (redone), c and d not done
    outcomes = run_cases(cases, fake_segmenter(out, calls), out, **kw)
    assert calls == ["b", "c", "d"]
    assert [o.status for o in outcomes] == ["skipped", "ok", "ok", "ok"]

    calls.clear()  # a case whose listed output is missing is not done
    (out / "c_seg.nii.gz").unlink()
    outcomes = run_cases(cases, fake_segmenter(out, calls), out, **kw)
    assert calls == ["c"] and [o.status for o in outcomes] == ["skipped", "skipped", "ok", "skipped"]
    assert [r["liver voxels"] for r in read_csv(out / "summary.csv")] == ["7"] * 4

    calls.clear()  # max_cases: at most one unfinished case per run; skipped ones do not count
    for name in ("b", "d"):
        (out / f"{name}.json").unlink()
    outcomes = run_cases(cases, fake_segmenter(out, calls), out, max_cases=1, **kw)
    assert calls == ["b"] and [o.case.name for o in outcomes] == ["a", "b", "c"]
    run_cases(cases, fake_segmenter(out, calls), out, max_cases=1, **kw)
    assert calls == ["b", "d"]

    calls.clear()  # other prompts: the done case is not reused silently; overwrite redoes everything
    outcomes = run_cases(cases, fake_segmenter(out, calls), out, **{**kw, "same_prompts": lambda s: False})
    assert calls == [] and {o.status for o in outcomes} == {"failed"}
    assert "other prompts" in outcomes[0].error
    run_cases(cases, fake_segmenter(out, calls), out, overwrite=True, **kw)
    assert calls == ["a", "b", "c", "d"]


def test_discovery_of_folders_and_list_files(data_dir, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(data_dir / GOOD, folder / "one.nii.gz")
    shutil.copytree(data_dir / SERIES, folder / "series")
    (folder / "notes").mkdir()  # no DICOM: not a case
    (folder / "README.md").write_text("notes")
    (folder / ".hidden.nii.gz").write_bytes(b"x")
    assert is_batch_input(folder) and not is_batch_input(folder / "series")
    assert not is_batch_input(data_dir / GOOD)
    cases = discover_cases(folder, exclude=[folder / "out"])
    assert [(c.name, c.path.name) for c in cases] == [("one", "one.nii.gz"), ("series", "series")]

    listing = tmp_path / "cases.txt"
    listing.write_text(f"# cases\n\ncases/one.nii.gz\n{folder / 'series'}\n")
    assert is_batch_input(listing)
    assert [c.path for c in discover_cases(listing)] == [tmp_path / "cases" / "one.nii.gz", folder / "series"]
    shutil.copy(data_dir / GOOD, folder / "one.nrrd")  # same name, different format: outputs would collide
    with pytest.raises(InputError, match="same name"):
        discover_cases(folder)
    with pytest.raises(InputError, match="no case"):
        discover_cases(folder / "notes")


def test_existing_summary_needs_every_listed_output(tmp_path):
    case = Case("a", tmp_path / "a.nii.gz")
    assert existing_summary(tmp_path, case) is None
    listed = {"outputs": {"labels": "a_seg.nii.gz", "dicom_seg": "a.dcm"}}
    (tmp_path / "a.json").write_text(json.dumps(listed))
    (tmp_path / "a_seg.nii.gz").write_bytes(b"x")
    assert existing_summary(tmp_path, case) is None
    (tmp_path / "a.dcm").write_bytes(b"x")
    assert existing_summary(tmp_path, case) is not None
    (tmp_path / "a.json").write_text("{ truncated")
    assert existing_summary(tmp_path, case) is None


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import Sam3Model

    from medsam3.model.configs import tiny_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    model = Sam3Model(tiny_sam3_config()).eval()
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    return save_sam3(model, build_processor(model.config), tmp_path_factory.mktemp("tiny") / "model")


def run(capsys, *argv):
    code = main(["segment", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def case_folder(data_dir, tmp_path) -> Path:
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(data_dir / GOOD, folder / "good.nii.gz")
    shutil.copytree(data_dir / SERIES, folder / "series")
    data = (data_dir / "msd_hippocampus/images/hippocampus_011.nii.gz").read_bytes()
    (folder / "broken.nii.gz").write_bytes(data[: len(data) // 2])  # truncated gzip stream
    return folder


def test_folder_with_a_broken_case(case_folder, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = [case_folder, "-p", "liver", "--slice-batch", "8", "--model", model_dir, "-o", out]
    code, stdout, err = run(capsys, *args)
    assert code == 1
    rows = {r["case"]: r for r in read_csv(out / "summary.csv")}
    assert {k: r["status"] for k, r in rows.items()} == {"broken": "failed", "good": "ok", "series": "ok"}
    assert "broken.nii.gz" in rows["broken"]["error"] and "truncated" in rows["broken"]["error"]
    assert "failed cases:" in err and "broken" in err and "3 cases: 2 ok, 0 skipped" in stdout
    good = json.loads((out / "good.json").read_text())
    assert rows["good"]["liver voxels"] == str(good["labels"][0]["voxels"])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "good_seg.nii.gz",
            "good_seg.json",
            "good_overlay.png",
            "good_montage.png",
            "good.json",
            "series_seg.nii.gz",
            "series_seg.json",
            "series_seg.dcm",
            "series_overlay.png",
            "series_montage.png",
            "series.json",
            "summary.csv",
        ]
    )

    # delete one case's outputs: only that one (and the broken one) is redone
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("good*")}
    for p in out.glob("series*"):
        p.unlink()
    code, stdout, _ = run(capsys, *args)
    assert code == 1
    rows = {r["case"]: r["status"] for r in read_csv(out / "summary.csv")}
    assert rows == {"broken": "failed", "good": "skipped", "series": "ok"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("good*")} == stamps
    assert (out / "series_seg.dcm").exists()

    # --overwrite redoes the good ones; other prompts without it are refused for the done cases
    code, _, _ = run(capsys, case_folder, "-p", "spleen", "--model", model_dir, "-o", out)
    assert code == 1
    rows = {r["case"]: r for r in read_csv(out / "summary.csv")}
    assert rows["good"]["status"] == "failed" and "other prompts" in rows["good"]["error"]
    code, _, _ = run(capsys, case_folder, "-p", "spleen", "--overwrite", "--model", model_dir, "-o", out)
    assert {r["case"]: r["status"] for r in read_csv(out / "summary.csv")}["good"] == "ok"


def test_interrupt_then_resume_from_a_list_file(case_folder, model_dir, tmp_path, capsys, monkeypatch):
    from medsam3.predict.segmenter import Segmenter

    listing = tmp_path / "list.txt"
    listing.write_text("cases/series\ncases/good.nii.gz\n")
    out = tmp_path / "out"
    args = [listing, "-p", "liver", "--model", model_dir, "-o", out]
    real = Segmenter.segment
    seen = []

    def interrupt_second(self, image, prompts, **kw):
        seen.append(image.meta["path"])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, image, prompts, **kw)

    monkeypatch.setattr(Segmenter, "segment", interrupt_second)
    code, _, err = run(capsys, *args)
    assert code == 130 and "interrupted" in err
    rows = read_csv(out / "summary.csv")
    assert [(r["case"], r["status"]) for r in rows] == [("series", "ok"), ("good", "interrupted")]
    assert not (out / "good.json").exists() and not list(out.glob(".*"))  # nothing half-written

    monkeypatch.setattr(Segmenter, "segment", real)
    code, stdout, _ = run(capsys, *args, "--max-cases", "0")
    assert code == 0 and "1 left for a later run" in stdout
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "2 cases: 1 ok, 1 skipped" in stdout
    assert [r["status"] for r in read_csv(out / "summary.csv")] == ["skipped", "ok"]


def test_batch_input_errors(case_folder, model_dir, tmp_path, capsys):
    # outputs inside a case (a DICOM series folder) are refused; inside the folder of cases they are not
    out = case_folder / "series" / "out"
    code, _, err = run(capsys, case_folder, "-p", "liver", "--model", model_dir, "-o", out)
    assert code == 2 and "refusing to write over an input" in err
    code, _, err = run(capsys, tmp_path / "missing.txt", "-p", "liver", "--model", model_dir, "-o", tmp_path)
    assert code == 2 and "no such file" in err
    code, _, err = run(
        capsys,
        case_folder,
        "-p",
        "liver",
        "--point",
        "1,1",
        "--box3d",
        "0,0,0,1,1,1",
        "--model",
        model_dir,
        "-o",
        tmp_path / "o",
    )
    assert code == 2 and "cannot be mixed" in err
