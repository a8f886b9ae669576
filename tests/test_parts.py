"""Parts of a cohort (``--num-parts K --part-id I``): a deterministic, name-based share of the cases.

Unit level: the share is a hash of the name (the same on every run, unmoved by added cases, every case in
exactly one part), the part CSV names and their merge. End to end: parts ``0..K-1`` of a folder of real
volumes with a tiny random SAM3 write the same outputs and the same cohort CSV as one run over the whole
folder, and either resumes the other.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from medsam3.cli import main
from medsam3.errors import OptionError
from medsam3.predict.batch_cases import Case
from medsam3.predict.parts import (
    check_part,
    merge_part_summaries,
    part_of,
    part_summary_path,
    select_part,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src/medsam3/assets/samples/hippocampus_019.nii.gz"
CROPS = ("hippocampus_001", "hippocampus_011", "hippocampus_015")  # msd_hippocampus/images, MR NIfTI


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def names_in_every_part(candidates, num_parts: int, count: int) -> list[str]:
    """``count`` names from ``candidates`` such that each of the ``num_parts`` parts holds at least one."""
    chosen: list[str] = []
    for part in range(num_parts):
        chosen.append(next(n for n in candidates if part_of(n, num_parts) == part and n not in chosen))
    chosen += [n for n in candidates if n not in chosen][: count - len(chosen)]
    return sorted(chosen)


def make_cases(data_dir: Path, folder: Path, count: int = 4, num_parts: int = 2) -> Path:
    """A folder of ``count`` small MR volumes: the bundled sample and 8-slice crops of sample volumes,
    named so that each of ``num_parts`` parts gets at least one."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    names = names_in_every_part([f"case{i:02d}" for i in range(40)], num_parts, count)
    sources = [None, *CROPS]
    for i, name in enumerate(names):
        source = sources[i % len(sources)]
        if source is None:
            shutil.copy(SAMPLE, folder / f"{name}.nii.gz")
            continue
        image = nib.load(data_dir / "msd_hippocampus/images" / f"{source}.nii.gz")
        nib.save(image.slicer[:, :, 4 + i : 12 + i], folder / f"{name}.nii.gz")
    return folder


def label_maps(out: Path) -> dict[str, np.ndarray]:
    """Each case's label-map array by file name."""
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))}


def json_labels(out: Path) -> dict[str, list]:
    """Each case JSON's labels (the part of the JSON that does not depend on the run's timing)."""
    return {
        p.name: json.loads(p.read_text())["labels"]
        for p in sorted(out.glob("*.json"))
        if not p.name.endswith("_seg.json")
    }


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "status")} for r in rows]


# --------------------------------------------------------------------------------------------------
# the share


def test_the_share_is_a_hash_of_the_name():
    names = [f"case_{i:04d}" for i in range(1000)]
    # fixed values: a change of the hash would move cases of cohorts already split
    assert [part_of(n, 4) for n in ("case_0000", "liver_001", "CT_Abd_x")] == [2, 3, 2]
    assert [part_of(n, 1000) for n in ("case_0000", "liver_001", "CT_Abd_x")] == [766, 915, 346]
    assert part_of("liver_001", 1) == 0
    cases = [Case(n, Path(f"/data/{n}.nii.gz")) for n in names]
    parts = [select_part(cases, 4, i) for i in range(4)]
    assert sorted(c.name for p in parts for c in p) == names  # every case, once
    assert all(220 <= len(p) <= 280 for p in parts)  # about a quarter each
    assert [c.name for c in parts[1]] == [n for n in names if part_of(n, 4) == 1]  # in list order

    # adding cases, or listing them in another order, moves no case to another part
    more = [Case(f"new_{i}", Path(f"/data/new_{i}.nii.gz")) for i in range(50)]
    grown = select_part(list(reversed(cases)) + more, 4, 1)
    assert {c.name for c in grown if c.name.startswith("case_")} == {c.name for c in parts[1]}

    # the value is the same in any process (sha256, not Python's salted hash)
    import subprocess
    import sys

    code = "from medsam3.predict.parts import part_of; print(part_of('liver_001', 7))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == part_of("liver_001", 7)


def test_part_checks_and_names(tmp_path):
    check_part(1, 0)
    for k, i in ((0, 0), (3, 3), (3, -1)):
        with pytest.raises(OptionError):
            check_part(k, i)
    assert part_summary_path(tmp_path / "summary.csv", 2, 5) == tmp_path / "summary.part-2-of-5.csv"
    assert part_summary_path(tmp_path / "cohort", 0, 2) == tmp_path / "cohort.part-0-of-2.csv"


def test_merge_in_list_order_with_missing_parts(tmp_path):
    cohort = tmp_path / "summary.csv"
    header = "case,input,status,error,seconds,liver voxels\n"
    part_summary_path(cohort, 0, 3).write_text(header + "c,/c,ok,,1.00,3\na,/a,failed,broken,0.10,\n")
    part_summary_path(cohort, 2, 3).write_text(header + "b,/b,skipped,,2.00,5\nz,/z,ok,,1.00,1\n")
    part_summary_path(cohort, 1, 2).write_text(header + "q,/q,ok,,1.00,9\n")  # another K: not merged
    cases = [Case(n, Path(f"/{n}")) for n in ("a", "b", "c")]
    report = merge_part_summaries(cohort, 3, cases)
    assert report.parts == [0, 2] and report.missing == [1] and report.rows == 4
    rows = read_csv(cohort)
    assert [r["case"] for r in rows] == ["a", "b", "c", "z"]  # the list's order, then unlisted by name
    assert rows[0]["error"] == "broken" and rows[1]["liver voxels"] == "5"

    # merges under the lock: many at once leave one complete CSV
    threads = [threading.Thread(target=merge_part_summaries, args=(cohort, 3, cases)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["case"] for r in read_csv(cohort)] == ["a", "b", "c", "z"]
    assert not [p for p in tmp_path.iterdir() if ".part" in p.name and p.name.startswith(".")]


def test_many_case_options_are_checked(tmp_path, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(SAMPLE, folder / "a.nii.gz")
    base = ["segment", str(folder), "-p", "liver", "-o", str(tmp_path / "out")]
    for extra, message in (
        (["--part-id", "1"], "go with --num-parts"),
        (["--num-parts", "2"], "needs --part-id"),
        (["--num-parts", "2", "--part-id", "2"], "0..1"),
        (["--workers", "2"], "options of --engine ray"),
        (["--engine", "ray", "--device", "cuda:1"], "gives each worker its own GPUs"),
    ):
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["segment", str(SAMPLE), "-p", "liver", "-o", str(tmp_path / "o"), "--num-parts", "1"]) == 2
    assert "for many cases" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# end to end


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["segment", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parts_together_equal_the_whole_run(data_dir, serve_model, tmp_path, capsys):
    cases = make_cases(data_dir, tmp_path / "cases", count=4, num_parts=2)
    common = [cases, "-p", "hippocampus", "--model", serve_model, "--device", "cpu", "--no-overlay"]
    whole = tmp_path / "whole"
    code, _, _ = run_cli(capsys, *common, "-o", whole)
    assert code == 0

    parted = tmp_path / "parted"
    seen: list[set[str]] = []
    for part in (1, 0):
        code, stdout, _ = run_cli(capsys, *common, "-o", parted, "--num-parts", 2, "--part-id", part)
        assert code == 0 and f"part {part} of 2" in stdout
        rows = read_csv(parted / f"summary.part-{part}-of-2.csv")
        seen.append({r["case"] for r in rows})
        assert all(part_of(name, 2) == part for name in seen[-1])
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # no case in two parts
    assert "merged 2 of 2 part summaries (4 cases)" in stdout

    assert sorted(p.name for p in parted.iterdir() if p.name.endswith((".nii.gz", ".json"))) == sorted(
        p.name for p in whole.iterdir() if p.name.endswith((".nii.gz", ".json"))
    )
    maps, reference = label_maps(parted), label_maps(whole)
    assert maps.keys() == reference.keys() and len(maps) == 4
    for name, array in reference.items():
        assert np.array_equal(maps[name], array) and maps[name].dtype == array.dtype, name
    assert json_labels(parted) == json_labels(whole)
    assert without_timing(read_csv(parted / "summary.csv")) == without_timing(read_csv(whole / "summary.csv"))

    # the merge on its own, and a run without parts resumes the parts' folder (nothing redone)
    (parted / "summary.csv").unlink()
    code, stdout, _ = run_cli(capsys, cases, "-o", parted, "--num-parts", 2, "--merge-parts")
    assert code == 0 and len(read_csv(parted / "summary.csv")) == 4
    code, stdout, _ = run_cli(capsys, *common, "-o", parted)
    assert code == 0 and "4 cases: 0 ok, 4 skipped" in stdout
    # a part re-run skips its done cases
    code, stdout, _ = run_cli(capsys, *common, "-o", parted, "--num-parts", 2, "--part-id", 0)
    assert code == 0 and f"part 0 of 2: {len(seen[1])} of 4 cases: 0 ok, {len(seen[1])} skipped" in stdout
