"""``medsam3 segment CASES --engine ray`` on a local Ray instance that the tests start (2 CPUs, 127.0.0.1).

The outputs must be those of the single-process folder run, array for array; a broken case is listed and
the others finish; a worker killed in the middle of a case loses nothing and duplicates nothing; re-runs
skip finished cases, whichever engine made them; parts run on either engine add up to the cohort.

Without Ray these tests skip, unless ``MEDSAM3_REQUIRE_SERVICES=1`` (CI, which installs the
``distributed`` extra): then they fail.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsam3.errors import OptionError
from medsam3.io.atomic import remove_stale_temporaries
from medsam3.predict import ray_engine
from medsam3.predict.ray_engine import RaySettings, import_ray, plan_workers
from test_parts import json_labels, label_maps, make_cases, read_csv, run_cli, without_timing

WORKERS = ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "0.5"]
#: Two workers that take both CPUs of the local instance: no CPU is left for read tasks, so each worker
#: reads its own cases.
WORKERS_READ = ["--engine", "ray", "--workers", "2", "--cpus-per-worker", "1"]


def require_ray():
    """The ``ray`` module; skip without it, or fail with ``MEDSAM3_REQUIRE_SERVICES=1``."""
    try:
        import ray
    except ImportError:
        message = 'Ray is not installed: pip install "medsam3[distributed]"'
        if os.environ.get("MEDSAM3_REQUIRE_SERVICES", "").strip() not in ("", "0"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return ray


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module: 2 CPUs, no dashboard, bound to 127.0.0.1; shut down after."""
    ray = require_ray()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def cohort(data_dir, serve_model, tmp_path_factory):
    """Five small volumes, one broken file, and the single-process folder run over them."""
    root = tmp_path_factory.mktemp("cohort")
    cases = make_cases(data_dir, root / "cases", count=5, num_parts=2)
    (cases / "broken.nii.gz").write_bytes((cases / os.listdir(cases)[0]).read_bytes()[:300])
    return root, cases


def common(cases: Path, model: Path) -> list:
    return [cases, "-p", "hippocampus", "--model", model, "--device", "cpu", "--no-overlay"]


@pytest.fixture(scope="module")
def reference(cohort, serve_model):
    """The folder run without Ray (one process)."""
    from medsam3.cli import main

    root, cases = cohort
    out = root / "reference"
    code = main(["segment", *map(str, common(cases, serve_model)), "-o", str(out)])
    assert code == 1  # the broken case
    return out


def assert_same_outputs(out: Path, reference: Path) -> None:
    maps, expected = label_maps(out), label_maps(reference)
    assert maps.keys() == expected.keys() and len(maps) == 5
    for name, array in expected.items():
        assert maps[name].dtype == array.dtype and np.array_equal(maps[name], array), name
    assert json_labels(out) == json_labels(reference)
    assert outputs(out) == outputs(reference)


def outputs(folder: Path) -> list[str]:
    """The names of the case outputs in ``folder`` (not the summary CSVs, nor their hidden lock file)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".csv") and p.name[0] != ".")


# --------------------------------------------------------------------------------------------------
# without a cluster


def test_plan_of_workers():
    cpu = {"CPU": 16.0}
    gpu = {"CPU": 32.0, "GPU": 8.0}
    assert plan_workers(cpu, RaySettings()) == ray_engine._Plan(1, 0.0, 1.0, 1.0)
    assert plan_workers(gpu, RaySettings()) == ray_engine._Plan(8, 1.0, 1.0, 1.0)
    assert plan_workers(gpu, RaySettings(gpus_per_worker=0.5, cpus_per_worker=2)).workers == 16
    assert plan_workers(gpu, RaySettings(cpu_only=True, workers=4)).gpus == 0
    assert plan_workers({"CPU": 2.0}, RaySettings(workers=2, cpus_per_worker=1)).read_cpus == 0
    for resources, settings, message in (
        (cpu, RaySettings(gpus_per_worker=1), "has 0"),
        (gpu, RaySettings(workers=9), "need 9 GPUs"),
        ({"CPU": 2.0}, RaySettings(workers=3, cpus_per_worker=1), "need 3 CPUs"),
        (gpu, RaySettings(cpu_only=True, gpus_per_worker=1), "--device cpu"),
    ):
        with pytest.raises(OptionError, match=message):
            plan_workers(resources, settings)


def test_without_ray_the_install_command_is_named(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(OptionError, match=r"medsam3\[distributed\]"):
        import_ray()


# --------------------------------------------------------------------------------------------------
# on a local Ray instance


def test_same_outputs_as_one_process_and_resume(local_ray, cohort, reference, serve_model, capsys):
    root, cases = cohort
    out = root / "ray"
    code, stdout, err = run_cli(capsys, *common(cases, serve_model), "-o", out, *WORKERS)
    assert code == 1 and "6 cases: 5 ok, 0 skipped (already done), 1 failed" in stdout
    assert "failed cases:" in err and "broken" in err
    rows = read_csv(out / "summary.csv")
    assert without_timing(rows) == without_timing(read_csv(reference / "summary.csv"))
    assert [r["status"] for r in rows if r["case"] == "broken"] == ["failed"]
    assert_same_outputs(out, reference)

    # a re-run skips the finished cases (and rewrites none of them), the broken one is tried again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"}
    code, stdout, _ = run_cli(capsys, *common(cases, serve_model), "-o", out, *WORKERS)
    assert code == 1 and "6 cases: 0 ok, 5 skipped (already done), 1 failed" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"} == stamps

    # either engine resumes the other's folder
    code, stdout, _ = run_cli(capsys, *common(cases, serve_model), "-o", out)
    assert code == 1 and "0 ok, 5 skipped" in stdout
    resumed = root / "resumed"
    shutil.copytree(reference, resumed)
    for name in sorted(p.name[: -len(".json")] for p in resumed.glob("case*[0-9].json"))[:2]:
        for p in resumed.glob(f"{name}[._]*"):
            p.unlink()
    code, stdout, _ = run_cli(capsys, *common(cases, serve_model), "-o", resumed, *WORKERS)
    assert code == 1 and "2 ok, 3 skipped" in stdout
    assert_same_outputs(resumed, reference)


def killer(ray, monkeypatch) -> tuple[list, list[str]]:
    """Make every Ray run kill (``ray.kill``) the worker that holds a case in the middle of its work, at
    the first case outcome where one does. Returns the runs seen and the case killed."""
    runs: list = []
    killed: list[str] = []
    real = ray_engine.run_cases_ray

    def kill_once(outcome, run):
        if not runs or runs[-1] is not run:
            runs.append(run)
            killed.clear()
        if killed:
            return
        for ticket in list(run.inflight.values()):
            if ticket.ref is not None and not ray.wait([ticket.ref], timeout=0)[0]:  # still working
                killed.append(ticket.case.name)
                ray.kill(ticket.actor)
                return

    def with_killer(*args, **kwargs):
        return real(*args, **kwargs, on_outcome=kill_once)

    monkeypatch.setattr(ray_engine, "run_cases_ray", with_killer)
    return runs, killed


@pytest.mark.parametrize(
    ("workers", "read_cpus"), [(WORKERS, 1.0), (WORKERS_READ, 0.0)], ids=["read-tasks", "workers-read"]
)
def test_a_worker_killed_in_the_middle(
    local_ray, cohort, reference, serve_model, capsys, monkeypatch, workers, read_cpus
):
    root, cases = cohort
    out = root / f"killed-{read_cpus:g}"
    runs, killed = killer(local_ray, monkeypatch)
    code, stdout, err = run_cli(capsys, *common(cases, serve_model), "-o", out, *workers)
    assert code == 1 and "6 cases: 5 ok, 0 skipped (already done), 1 failed" in stdout
    assert "broken" in err  # the unreadable case fails the same way, whoever reads it
    run = runs[-1]
    assert run.plan.read_cpus == read_cpus
    assert killed and run.attempts == {killed[0]: 1} and run.replacements == 1
    rows = read_csv(out / "summary.csv")
    assert len(rows) == len({r["case"] for r in rows}) == 6  # each case once
    assert without_timing(rows) == without_timing(read_csv(reference / "summary.csv"))
    # the killed worker's temporaries, if it was writing, are removed as those of a dead process
    remove_stale_temporaries(out)
    assert_same_outputs(out, reference)


def test_retries_are_bounded(local_ray, cohort, reference, serve_model, capsys, monkeypatch):
    root, cases = cohort
    out = root / "no-retry"
    runs, killed = killer(local_ray, monkeypatch)
    code, stdout, err = run_cli(capsys, *common(cases, serve_model), "-o", out, *WORKERS, "--retries", "0")
    assert code == 1 and "6 cases: 4 ok, 0 skipped (already done), 2 failed" in stdout
    rows = {r["case"]: r for r in read_csv(out / "summary.csv")}
    lost = [name for name, r in rows.items() if "lost 1 time(s) on Ray (its worker died)" in r["error"]]
    assert lost == killed and lost[0] in err
    assert not (out / f"{lost[0]}.json").exists()
    monkeypatch.undo()
    code, stdout, _ = run_cli(capsys, *common(cases, serve_model), "-o", out, *WORKERS)
    assert code == 1 and "6 cases: 1 ok, 4 skipped (already done), 1 failed" in stdout
    remove_stale_temporaries(out)
    assert_same_outputs(out, reference)


def test_parts_on_both_engines_add_up(local_ray, cohort, reference, serve_model, capsys):
    root, cases = cohort
    out = root / "parts"
    code, stdout, _ = run_cli(
        capsys, *common(cases, serve_model), "-o", out, "--num-parts", 2, "--part-id", 0, *WORKERS
    )
    part0 = {r["case"] for r in read_csv(out / "summary.part-0-of-2.csv")}
    assert "merged 1 of 2 part summaries" in stdout and "no summary yet from part(s) 1" in stdout
    code, stdout, _ = run_cli(
        capsys, *common(cases, serve_model), "-o", out, "--num-parts", 2, "--part-id", 1
    )
    part1 = {r["case"] for r in read_csv(out / "summary.part-1-of-2.csv")}
    assert part0 and part1 and not part0 & part1 and len(part0 | part1) == 6
    assert "merged 2 of 2 part summaries (6 cases)" in stdout
    rows = read_csv(out / "summary.csv")
    assert without_timing(rows) == without_timing(read_csv(reference / "summary.csv"))
    assert_same_outputs(out, reference)
