"""Evaluation rows, aggregation, tables, gallery and Table 3 bookkeeping, against hand-computed values."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from medsam3.evaluate.figures import GalleryCollector, GalleryItem, gallery_html, render_case
from medsam3.evaluate.report import (
    absent_summary,
    dataset_table,
    summarize,
    table_csv,
    table_markdown,
    write_files,
    write_report,
)
from medsam3.evaluate.rows import (
    CASE_COLUMNS,
    AbsentRow,
    CaseRow,
    empty_slice_stats,
    failure_metrics,
    score_masks,
)
from medsam3.evaluate.table3 import PAPER_AVERAGES, PAPER_TABLE3, comparison, table3_csv, table3_markdown


def square_pair():
    ref = np.zeros((20, 30), bool)
    ref[5:15, 5:15] = True  # 100 pixels
    pred = np.zeros_like(ref)
    pred[5:15, 5:10] = True  # 50 pixels, inside the reference
    return pred, ref


def test_score_masks_by_hand():
    pred, ref = square_pair()
    m = score_masks(pred, ref, (0.5, 2.0), nsd_tolerance=1.0)
    assert m["dice"] == pytest.approx(2 * 50 / 150)
    assert m["iou"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(0.5)
    assert (m["pred_voxels"], m["ref_voxels"]) == (50, 100)
    # 2D with a known pixel size: areas in mm² (pixel = 0.5 x 2.0 = 1 mm²)
    assert (m["volume_unit"], m["pred_volume"], m["ref_volume"]) == ("mm2", 50.0, 100.0)
    assert m["distance_unit"] == "mm" and not m["distances_worst_case"]
    # the far edges are 5 columns apart at 2 mm per column
    assert m["hausdorff"] == pytest.approx(10.0)
    px = score_masks(pred, ref, (1.0, 1.0), spacing_known=False)
    assert (px["volume_unit"], px["distance_unit"], px["pred_volume"]) == ("px", "px", 50)
    assert px["hausdorff"] == pytest.approx(5.0)


def test_failures_are_scored_worst_case():
    _, ref = square_pair()
    m = failure_metrics(ref, (1.0, 1.0))
    diagonal = math.sqrt(20**2 + 30**2)
    assert (m["dice"], m["iou"], m["nsd"], m["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["hd95"] == m["assd"] == m["hausdorff"] == pytest.approx(diagonal)
    assert m["distances_worst_case"] is True
    # a missing prediction for an empty reference still counts as a failure, not a correct "absent"
    empty = failure_metrics(np.zeros((20, 30), bool), (1.0, 1.0))
    assert (empty["dice"], empty["hd95"]) == (0.0, pytest.approx(diagonal))
    # an empty prediction against an empty reference is a correct answer
    assert score_masks(np.zeros((4, 4), bool), np.zeros((4, 4), bool), 1.0)["dice"] == 1.0


def test_empty_slice_false_positives():
    ref = np.zeros((3, 4, 4), bool)
    ref[1, 1:3, 1:3] = True
    pred = np.zeros_like(ref)
    pred[0, 0, :2] = True  # 2 voxels on an empty slice
    pred[1] = ref[1]
    assert empty_slice_stats(pred, ref) == {"empty_slices": 2, "fp_slices": 1, "fp_pixel_rate": 2 / 32}
    assert empty_slice_stats(pred[0], ref[0]) == {}


def row(dataset, dice, model="A", role="internal", group="g", status="ok", case=None, iou=None):
    _, ref = square_pair()
    metrics = failure_metrics(ref, 1.0) if status != "ok" else score_masks(ref, ref, 1.0)
    metrics.update(dice=dice, iou=dice / (2 - dice) if iou is None else iou)
    return CaseRow(
        dataset=dataset,
        case=case or f"c{dice}",
        concept="x",
        model=model,
        prompt_mode="text",
        status=status,
        metrics=metrics,
        role=role,
        group=group,
    )


def test_summary_and_table_by_hand():
    rows = [
        row("A", 1.0, iou=1.0),
        row("A", 0.5, iou=0.25),
        row("B", 0.0, role="external", iou=0.0, status="missing"),
        row("A", 0.8, model="M", iou=0.5),
        row("A", 0.4, model="M", iou=0.5),
        row("B", 0.6, model="M", role="external", iou=0.4),
    ]
    summary = summarize(rows, n_boot=500)
    a = next(s for s in summary if s["level"] == "dataset" and s["name"] == "A" and s["model"] == "A")
    assert a["n"] == 2 and a["dice_mean"] == pytest.approx(0.75) and a["iou_mean"] == pytest.approx(0.625)
    for s in summary:
        for metric in ("dice", "iou", "nsd", "hd95"):
            assert s[f"{metric}_low"] <= s[f"{metric}_mean"] + 1e-12 <= s[f"{metric}_high"] + 2e-12
    overall = next(s for s in summary if s["level"] == "all" and s["model"] == "A")
    assert (overall["n"], overall["n_missing"], overall["n_ok"]) == (3, 1, 2)
    assert overall["dice_mean"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3 over cases

    table = dataset_table(rows)
    assert table["columns"] == ["A", "M"]
    internal, external = table["sections"]
    assert (internal["title"], external["title"]) == ("Internal", "External")
    assert internal["datasets"][0]["cells"]["A"] == pytest.approx((75.0, 62.5))
    assert internal["datasets"][0]["cells"]["M"] == pytest.approx((60.0, 50.0))
    assert external["datasets"][0]["cells"]["A"] == pytest.approx((0.0, 0.0))
    md = table_markdown(table)
    assert "| A | 2 | 75.0 | 62.5 | 60.0 | 50.0 |" in md
    assert "*Internal average (1 dataset)*" in md and "| B | 1 | 0.0 | 0.0 | 60.0 | 40.0 |" in md
    parsed = list(csv.DictReader(io.StringIO(table_csv(table))))
    assert [(r["section"], r["dataset"]) for r in parsed] == [
        ("Internal", "A"),
        ("Internal", "average"),
        ("External", "B"),
        ("External", "average"),
    ]
    assert float(parsed[0]["M dice %"]) == pytest.approx(60.0)


def test_section_average_is_mean_of_dataset_means():
    rows = [row("A", 1.0), row("A", 1.0), row("A", 1.0), row("B", 0.0)]
    table = dataset_table(rows)
    # cases: 3/4 = 75 %; datasets: (100 + 0) / 2 = 50 %
    assert table["sections"][0]["average"]["A"][0] == pytest.approx(50.0)


def test_gallery_keeps_best_and_worst_deterministically():
    g = GalleryCollector(per_side=2, max_side=16)
    ref = np.zeros((40, 40), bool)
    ref[10:30, 10:30] = True
    image = np.linspace(0, 1000, 1600).reshape(40, 40)
    for k, d in enumerate([0.3, 0.9, 0.1, 0.9, 0.5]):
        g.offer(row("A", d, case=f"case{k}"), image, ref, ref)
    items = g.items()
    assert [(i.kind, i.rank, i.row.case) for i in items] == [
        ("best", 1, "case1"),
        ("best", 2, "case3"),
        ("worst", 1, "case2"),
        ("worst", 2, "case0"),
    ]
    assert all(max(i.ref.shape) <= 16 and i.image.dtype == np.uint8 for i in items)
    small = GalleryCollector(per_side=2)
    for k, d in enumerate([0.2, 0.7, 0.5]):
        small.offer(row("A", d, case=f"c{k}"), None, ref, None)
    assert [(i.kind, i.row.case) for i in small.items()] == [("best", "c1"), ("best", "c2"), ("worst", "c0")]
    html = gallery_html(items)
    assert html.count("<img ") == 4 and "case2" in html


def test_gallery_of_a_volume_shows_the_fullest_slice():
    g = GalleryCollector(per_side=1)
    ref = np.zeros((5, 8, 8), bool)
    ref[1, 2:4, 2:4] = True
    ref[3, 1:7, 1:7] = True
    g.offer(row("V", 0.5), np.zeros((5, 8, 8)), ref, ref)
    (item,) = g.items()
    assert item.slice_index == 3 and item.ref.sum() == 36


def test_write_report_files_and_html_links(tmp_path):
    rows = [row("A", d, case=f"k{i}") for i, d in enumerate([0.2, 0.9, 0.6])]
    g = GalleryCollector(per_side=1)
    _, ref = square_pair()
    for r in rows:
        g.offer(r, None, ref, ref)
    absent = [
        AbsentRow("A", "k0", "A", "liver", 0, 600),
        AbsentRow("A", "k0", "A", "lung", 5, 600),
        AbsentRow("A", "k1", "A", "liver", 0, 600),
    ]
    out = write_report(tmp_path / "rep", rows, {"form": "test"}, g.items(), absent, n_boot=200)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {
        "cases.csv",
        "summary.csv",
        "table.md",
        "table.csv",
        "config.json",
        "dice_by_dataset.png",
        "dice_by_modality.png",
        "gallery.html",
        "absent.csv",
        "absent_summary.csv",
    } <= names
    with open(out / "cases.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CASE_COLUMNS
        assert len(list(reader)) == 3
    html = (out / "gallery.html").read_text()
    links = re.findall(r'src="([^"]+)"', html)
    assert len(links) == 2 and all((out / link).is_file() for link in links)
    assert all((out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for link in links)
    config = json.loads((out / "config.json").read_text())
    assert config["counts"] == {"rows": 3, "missing": 0, "failed": 0, "absent_prompts": 3}
    summary = list(csv.DictReader(open(out / "absent_summary.csv")))
    overall = next(s for s in summary if s["dataset"] == "all")
    assert (overall["images"], overall["images_with_fp"], float(overall["image_fp_rate"])) == ("2", "1", 0.5)
    assert float(overall["prompt_fp_rate"]) == pytest.approx(1 / 3)
    assert "Absent-concept test" in (out / "table.md").read_text()
    # a second report in the same folder replaces the gallery pictures of the first
    write_report(out, rows[:1], {"form": "test"}, [], n_boot=50)
    assert not list((out / "gallery").glob("*.png"))


def test_write_files_is_all_or_nothing(tmp_path):
    def boom(path: Path) -> None:
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        write_files(tmp_path / "rep", {"a.txt": "first", "b.png": b"\x89PNG", "c.txt": boom})
    assert not [p for p in (tmp_path / "rep").rglob("*") if p.is_file()]


def test_absent_summary_per_dataset():
    rows = [
        AbsentRow("D1", "a", "m", "x", 3, 100),
        AbsentRow("D1", "b", "m", "x", 0, 100),
        AbsentRow("D2", "c", "m", "x", 0, 100),
    ]
    s = {r["dataset"]: r for r in absent_summary(rows, n_boot=100)}
    assert s["D1"]["image_fp_rate"] == 0.5 and s["D2"]["image_fp_rate"] == 0.0
    assert s["all"]["images"] == 3 and s["all"]["image_fp_rate"] == pytest.approx(1 / 3)


# -- Table 3 -------------------------------------------------------------------------------------------
def test_paper_numbers_match_the_papers_averages():
    internal = [r for r in PAPER_TABLE3 if r.section == "internal"]
    external = [r for r in PAPER_TABLE3 if r.section == "external"]
    assert len(internal) == 10 and len(external) == 7
    # sums written out by hand from the paper's Table 3
    assert sum(r.sam3_dice for r in internal) == pytest.approx(539.6)
    assert sum(r.medsam3_dice for r in internal) == pytest.approx(770.5)
    assert sum(r.sam3_dice for r in external) == pytest.approx(83.0)
    assert sum(r.medsam3_dice for r in external) == pytest.approx(517.1)
    assert PAPER_AVERAGES["internal"]["dice"] == (54.0, 77.0)
    assert PAPER_AVERAGES["external"]["dice"] == (11.9, 73.9)
    from medsam3.data import registry

    for r in PAPER_TABLE3:  # every dataset is a registry entry of the matching role
        entry = registry.get(r.dataset)
        assert entry.name == r.dataset
        assert entry.role == ("internal-eval" if r.section == "internal" else "external")


def test_comparison_by_hand():
    rows = [
        row("HC18", 0.5, model="SAM3", iou=0.4),
        row("HC18", 0.9, model="Medical SAM3", iou=0.8),
        row("FetoPlac", 0.6, model="SAM3"),
        row("FetoPlac", 0.8, model="Medical SAM3"),
    ]
    comp = comparison(rows, {"DRIVE": "no folder"})
    hc = next(e for e in comp["datasets"] if e["dataset"] == "HC18")
    assert (hc["ours_sam3"], hc["ours_medsam3"], hc["n"]) == (pytest.approx(50.0), pytest.approx(90.0), 1)
    ext = next(a for a in comp["averages"] if a["section"] == "external")
    assert ext["datasets_run"] == 1 and ext["paper_same_medsam3_dice"] == pytest.approx(92.6)
    assert ext["ours_sam3_iou"] == pytest.approx(40.0)
    md = table3_markdown(comp)
    assert "| HC18 | 1 | 23.9 | 50.0 | +26.1 | 92.6 | 90.0 | -2.6 |  |" in md
    assert "| DRIVE |  | 24.8 | – | – | 55.8 | – | – | no folder |" in md
    parsed = list(csv.DictReader(io.StringIO(table3_csv(comp))))
    assert len(parsed) == 19
    fp = next(r for r in parsed if r["dataset"] == "FetoPlac")
    assert float(fp["diff_sam3_dice"]) == pytest.approx(60.0 - 56.6)


def test_gallery_panel_from_read_only_arrays_without_prediction():
    # 256 px needs no upscaling: the panels are drawn on the read-only input's own grid
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    ref = np.zeros((256, 256), dtype=bool)
    ref[100:150, 100:150] = True
    for a in (image, ref):
        a.flags.writeable = False
    png = render_case(GalleryItem(row=row("A", 1.0), image=image, ref=ref, pred=None, slice_index=None))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
