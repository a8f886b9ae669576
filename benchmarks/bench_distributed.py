"""Benchmark: many cases on Ray (``medsam3 segment CASES --engine ray``) against the in-process folder loop.

Measures, each in a fresh subprocess (so that its peak resident memory is its own):

* **throughput**: cases per hour of the bundled ``medsam3-nano`` model (CPU, one PyTorch thread per
  worker) on MR volumes of the MSD hippocampus sample, with the in-process loop, and with Ray and 1 and 2
  workers on a local Ray instance limited to 2 CPUs. The steady rate counts the cases after the first one of
  each worker (model loading and Ray start-up excluded), the total wall time includes everything;
* **per-case overhead** of the Ray path: a job that reads the file and writes a small JSON, no model, run
  through both engines; the difference of the seconds per case is what Ray adds to each case (a read
  task, the object store, an actor call, the driver's bookkeeping);
* **driver memory**: the Ray driver's peak resident memory (``ru_maxrss``) for 100, 1,000 and 5,000
  listed cases (the same no-model job, 2 workers), and its resident memory before the run.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py [--cases 12] [--overhead-cases 200]

Writes ``benchmarks/results/distributed.md`` (measurements, the command, the machine and its load). The
deployment recipe for a GPU cluster at the end of that file is text kept in this script (:data:`RECIPE`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = Path(os.environ.get("MEDSAM3_DATA") or REPO.parent / "shared" / "data")
SAMPLE = REPO / "src/medsam3/assets/samples/hippocampus_019.nii.gz"
#: Listed cases of the driver-memory runs.
MEMORY_COUNTS = (100, 1000, 5000)


def maxrss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


# --------------------------------------------------------------------------------------------------
# jobs


class NoModelJob:
    """A per-case job without a model: reads the case's bytes, writes ``<name>.json`` (atomically)."""

    def __init__(self, out: Path):
        self.out = out
        self.protected: tuple[Path, ...] = ()

    def segmenter(self) -> None:
        return None

    def read(self, case) -> bytes:
        return case.path.read_bytes()

    def segment(self, case, loaded, elapsed: float = 0.0) -> dict:
        from medsam3.io.atomic import write_text_atomic

        summary = {"labels": [], "outputs": {}, "case": {"seconds": elapsed, "bytes": len(loaded)}}
        write_text_atomic(self.out / f"{case.name}.json", json.dumps(summary))
        return summary

    def __call__(self, case) -> dict:
        start = time.perf_counter()
        data = self.read(case)
        return self.segment(case, data, time.perf_counter() - start)

    def same_prompts(self, summary: dict, case) -> bool:
        return True


def segment_job(out: Path):
    """The ``medsam3 segment CASES -p hippocampus --device cpu --no-overlay`` job (bundled model)."""
    from medsam3.cli import build_parser
    from medsam3.commands.inference_options import options_from_args
    from medsam3.commands.segment import CaseJob
    from medsam3.predict.case_prompts import PromptSources
    from medsam3.predict.prompts import prompts_from_cli
    from medsam3.predict.volume.prompts import volume_prompts_from_cli

    args = build_parser().parse_args(
        ["segment", "x", "-p", "hippocampus", "-o", str(out), "--device", "cpu", "--no-overlay"]
    )
    sources = PromptSources.from_args(args.prompt_items)
    items = list(sources.items)
    return CaseJob(
        out=out,
        model=None,
        device="cpu",
        dtype=args.dtype,
        options=options_from_args(args, "segment"),
        sources=sources,
        volume_prompts=volume_prompts_from_cli(items),
        prompts_2d=prompts_from_cli(items),
        overlay=False,
    )


# --------------------------------------------------------------------------------------------------
# one measurement (a child process)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) used so far by every process of the machine, by process id, with the
    process's role (:func:`process_role`)."""
    import psutil

    seen: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        role = process_role(proc.info["name"] or "", proc.info["cmdline"] or [])
        seen[proc.info["pid"]] = (role, times.user + times.system)
    return seen


def process_role(name: str, cmdline: list[str]) -> str:
    """What a process is in a Ray run: ``driver`` (this benchmark's process), ``model worker`` (a
    ``CaseWorker`` actor), ``read task`` (a Ray task process: ``read_case``, or idle), ``ray: raylet``,
    ``ray: DashboardAgent`` ... (Ray's own processes), else ``other``."""
    if name.startswith("ray::"):
        what = name[len("ray::") :]
        if what.startswith("CaseWorker"):
            return "model worker"
        if what.startswith(("IDLE", "read_case")):
            return "read task"
        return f"ray: {what}"
    if name in ("raylet", "gcs_server"):
        return f"ray: {name}"
    scripts = [Path(part).name for part in cmdline[:3]]
    if "bench_distributed.py" in scripts:
        return "driver"
    for script in ("log_monitor.py", "monitor.py", "dashboard.py", "default_worker.py"):
        if script in scripts:
            return "read task" if script == "default_worker.py" else f"ray: {script}"
    return "other"


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict:
    """CPU seconds used between two :func:`cpu_seconds` snapshots, summed by role."""
    used: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        start = before.get(pid, (role, 0.0))[1]
        used[role] = used.get(role, 0.0) + max(0.0, seconds - start)
    return used


def child(kind: str, cases_dir: Path, out: Path, workers: int, cores: int = 0, half: int = -1) -> dict:
    """One measurement: ``local`` / ``nomodel-local`` (the in-process loop) or ``ray`` / ``nomodel-ray``.

    ``cores`` > 0: the process, and every process it starts (Ray's own and its workers), may run on the
    first ``cores`` CPUs only, and Ray is given that many CPUs; 0: all CPUs, Ray given 2. ``half`` 0 or 1:
    only the cases of even (odd) index (two such children run at the same time measure two plain
    processes side by side).
    """
    if cores:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    import torch

    from medsam3.predict.batch_cases import discover_cases, run_cases

    torch.set_num_threads(1)
    cases = discover_cases(cases_dir)
    if half >= 0:
        cases = cases[half::2]
    out.mkdir(parents=True, exist_ok=True)
    job = NoModelJob(out) if kind.startswith("nomodel") else segment_job(out)
    stamps: list[float] = []  # seconds from the start of the run to each case's end
    common = dict(same_case_prompts=job.same_prompts, label_names=["hippocampus"], show_progress=False)
    result: dict = {"kind": kind, "cases": len(cases), "workers": workers, "cores": cores}
    t0 = time.perf_counter()
    if kind.endswith("local"):
        job.segmenter()  # the model, loaded before the cases (as the CLI does)
        result["load_s"] = time.perf_counter() - t0
        start = time.perf_counter()

        def timed(case):
            summary = job(case)
            stamps.append(time.perf_counter() - start)
            return summary

        outcomes = run_cases(cases, timed, out, **common)
    else:
        import ray

        from medsam3.predict.ray_engine import RaySettings, run_cases_ray

        ray.init(
            num_cpus=cores or 2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False
        )
        result["ray_init_s"] = time.perf_counter() - t0
        result["rss_before_mib"] = rss_mib()
        settings = RaySettings(workers=workers, cpus_per_worker=1, cpu_only=True)
        snapshots: list[dict] = []

        def on_outcome(outcome, run) -> None:
            stamps.append(time.perf_counter() - start)
            if len(stamps) == workers or len(stamps) == len(cases):  # the steady part: after the first cases
                snapshots.append(cpu_seconds())

        start = time.perf_counter()
        outcomes = run_cases_ray(cases, job, out, settings=settings, on_outcome=on_outcome, **common)
        if len(snapshots) == 2:
            result["cpu_s"] = cpu_by_role(*snapshots)
    result["run_s"] = time.perf_counter() - start
    result["wall_s"] = time.perf_counter() - t0
    result["ok"] = sum(o.status == "ok" for o in outcomes)
    result["peak_rss_mib"] = maxrss_mib()
    result["stamps"] = stamps
    return result


def steady_rate(result: dict) -> float:
    """Cases per hour after each worker's first case: (n - w) / (t_n - t_w)."""
    stamps = sorted(result["stamps"])
    w = result["workers"] if result["kind"] != "local" else 1
    if len(stamps) <= w:
        return float("nan")
    return 3600 * (len(stamps) - w) / (stamps[-1] - stamps[w - 1])


def child_command(kind: str, cases_dir: Path, out: Path, workers: int, cores: int, half: int) -> list[str]:
    return [sys.executable, __file__, "--child", kind, str(cases_dir), str(out)] + [
        str(workers),
        str(cores),
        str(half),
    ]


CHILD_ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")


def child_result(kind: str, returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        raise SystemExit(f"{kind} failed:\n{stderr[-4000:]}")
    line = [x for x in stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)


def run_child(kind: str, cases_dir: Path, out: Path, workers: int = 1, cores: int = 0) -> dict:
    command = child_command(kind, cases_dir, out, workers, cores, -1)
    done = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV, cwd=REPO)
    result = child_result(kind, done.returncode, done.stdout, done.stderr)
    print(
        f"{kind:>14} workers={workers} cores={cores or 'all'} cases={result['cases']} "
        f"run {result['run_s']:.1f}s "
        f"peak {result['peak_rss_mib']:.0f} MiB",
        flush=True,
    )
    return result


def run_side_by_side(cases_dir: Path, out: Path) -> dict:
    """Two plain in-process loops at the same time, on the even and the odd cases (what ``--num-parts 2``
    does, with equal halves): what two independent processes reach on this machine, with no Ray."""
    procs = [
        subprocess.Popen(
            child_command("local", cases_dir, out / f"half{h}", 1, 0, h),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=CHILD_ENV,
            cwd=REPO,
        )
        for h in (0, 1)
    ]
    halves = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        halves.append(child_result("side-by-side", proc.returncode, stdout, stderr))
    rate = sum(steady_rate(h) for h in halves)
    print(f"  side-by-side: two plain loops, steady {rate:.0f} cases/hour together", flush=True)
    return {"kind": "side-by-side", "halves": halves, "steady_rate": rate, "ok": sum(h["ok"] for h in halves)}


# --------------------------------------------------------------------------------------------------
# the report

RECIPE = """\
## Deployment recipe: a GPU cluster

**Cluster** (N nodes x G GPUs). Install the same environment on every node (`pip install
"medsam3[distributed]"`, plus `ray[default]` on the head node for the dashboard), and mount the cohort and the
output folder at the same path on every node (NFS, Lustre, a CephFS or FSx volume): the driver lists the
cases, the workers read them and write the outputs by path. Start Ray by hand:

```bash
# head node
ray start --head --port=6379 --num-gpus=G --num-cpus=C
# each other node
ray start --address=HEAD_IP:6379 --num-gpus=G --num-cpus=C
```

or with the cluster launcher (`ray up cluster.yaml`), a minimal configuration for fixed machines:

```yaml
cluster_name: medsam3
provider: {type: local, head_ip: 10.0.0.1, worker_ips: [10.0.0.2, 10.0.0.3]}   # N = 3
auth: {ssh_user: ubuntu}
min_workers: 2
max_workers: 2
setup_commands:
  - pip install "medsam3[distributed]" "ray[default]"
head_start_ray_commands:
  - ray stop
  - ray start --head --port=6379 --autoscaling-config=~/ray_bootstrap_config.yaml
worker_start_ray_commands:
  - ray stop
  - ray start --address=$RAY_HEAD_IP:6379
```

**Run** from the head node (or any machine that sees the shared paths, with `--address ray://HEAD_IP:10001`):

```bash
medsam3 segment /shared/cohort/ -p liver -p spleen -o /shared/preds/ --engine ray --address auto \\
    --gpus-per-worker 1 --cpus-per-worker 4        # one model actor per GPU: N x G workers
```

Reading and decoding run as CPU tasks beside the actors (give the nodes more CPUs than `G x
--cpus-per-worker` so that reads do not wait), at most `2 x workers` cases are between reading and writing,
and the driver only lists paths. Re-run the same command after a stop: finished cases (their JSON exists)
are skipped, by either engine. Without Ray, the same split by hand: `--num-parts K --part-id I --device
cuda:I` per GPU, or one scheduler job per part (`sbatch --array=0..K-1`), then `--merge-parts` or the
last part's automatic merge.

**Expected throughput**: workers do not share anything but the storage, so a cluster should reach about
`N x G x (one GPU's cases per hour)`, less the per-case overhead measured above and as long as reading
keeps up (a 512 x 512 x 300 CT is ~150 MB to read and decode: a node reading from shared storage at
1 GB/s feeds ~6 cases per second, far above a GPU's rate). This file has no GPU measurement: the
single-GPU rate of the released model has to be measured on the target GPU (run this benchmark's
`segment` job there with `--device cuda`) before a cluster can be sized; for the issue's example, 5,000
CT scans at ~10 s per scan on one GPU (14 h) would need 8 GPUs for under 2 h.
"""


def busy_note(load_start: str) -> list[str]:
    """A warning paragraph when the machine was already busy at the start (1-minute load >= its CPUs)."""
    if float(load_start.split("/")[0]) < (os.cpu_count() or 1):
        return []
    return [
        "The machine was already busy when the run started (1-minute load average at or above its "
        f"{os.cpu_count()} CPUs, from other work): a second worker finds no idle core, so this ratio "
        "measures the contention, not how Ray scales. Rerun on an idle machine (or give Ray cores nothing "
        "else uses) before reading it as a scaling figure.",
        "",
    ]


def report(results: dict, args, started: float, load_start: str) -> str:
    local, ray1, ray2 = results["local"], results["ray1"], results["ray2"]
    rate = {k: steady_rate(results[k]) for k in ("local", "ray1", "ray2", "ray1-core1", "local-core1")}
    total = {k: 3600 * v["ok"] / v["run_s"] for k, v in (("local", local), ("ray1", ray1), ("ray2", ray2))}
    nm_local, nm_ray = results["nomodel-local"], results["nomodel-ray1"]
    per_local = nm_local["run_s"] / nm_local["cases"]
    per_ray = (sorted(nm_ray["stamps"])[-1] - sorted(nm_ray["stamps"])[0]) / (nm_ray["cases"] - 1)
    mems = [results[f"mem-{count}"] for count in MEMORY_COUNTS]
    sbs = results["side-by-side"]
    roles = sorted({r for k in ("ray1", "ray2") for r in results[k].get("cpu_s", {})})
    import torch

    lines = [
        "# Many cases on Ray: throughput, per-case overhead and driver memory (CPU)",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_distributed.py --cases {args.cases} "
        f"--overhead-cases {args.overhead_cases}`",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, shared "
        f"with other work; load average (1, 5, 15 min) {load_start} at the start, {load_average()} at the "
        "end (expect tens of percent of noise)",
        f"- Python {platform.python_version()}, torch {torch.__version__}, ray {results['ray_version']}",
        "- Ray: a local instance with `num_cpus=2`, workers of 1 CPU and 1 PyTorch thread each; the "
        "in-process loop also runs with 1 thread",
        f"- cases: {args.cases} MR volumes of MSD hippocampus (about 35 x 50 x 35 voxels), prompt "
        "`hippocampus`, bundled `medsam3-nano` model, `--device cpu --no-overlay`",
        f"- total benchmark time {time.time() - started:.0f} s",
        "",
        "## Throughput",
        "",
        "| engine | workers | cases | steady cases/hour | cases/hour incl. start-up | wall s (all) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| in-process loop | 1 | {local['ok']} | {rate['local']:.0f} | {total['local']:.0f} | "
        f"{local['wall_s']:.1f} |",
        f"| Ray | 1 | {ray1['ok']} | {rate['ray1']:.0f} | {total['ray1']:.0f} | {ray1['wall_s']:.1f} |",
        f"| Ray | 2 | {ray2['ok']} | {rate['ray2']:.0f} | {total['ray2']:.0f} | {ray2['wall_s']:.1f} |",
        f"| two plain loops side by side (even / odd cases) | 2 | {sbs['ok']} | {sbs['steady_rate']:.0f} | "
        f"- | {max(h['wall_s'] for h in sbs['halves']):.1f} |",
        "",
        f"1 -> 2 workers: **{rate['ray2'] / rate['ray1']:.2f}x** steady "
        f"({total['ray2'] / total['ray1']:.2f}x with start-up; goal >= 1.7x on 2 cores). Steady rate: the "
        "cases after each worker's first one, (n - w) / (t_n - t_w); start-up: Ray workers start and load "
        "the model "
        f"(Ray itself started in {ray1['ray_init_s']:.1f} s / {ray2['ray_init_s']:.1f} s, not counted).",
        "",
        "What the machine itself gives two processes: two plain in-process loops started together, each "
        "on half the cases (what `--num-parts 2` does, with no Ray), reach "
        f"**{sbs['steady_rate'] / rate['local']:.2f}x** the single loop; Ray with 2 workers reaches "
        f"**{rate['ray2'] / sbs['steady_rate']:.0%}** of that.",
        "",
        "CPU seconds by process during the steady part of each Ray run (from the workers' first cases to "
        "the last case; processes that started and ended in between are not seen):",
        "",
        "| run | " + " | ".join(roles) + " |",
        "|---|" + "---:|" * len(roles),
        *(
            f"| Ray, {results[k]['workers']} worker(s) | "
            + " | ".join(f"{results[k].get('cpu_s', {}).get(r, 0.0):.1f}" for r in roles)
            + " |"
            for k in ("ray1", "ray2")
        ),
        "",
        "With 2 workers of 1 CPU each on a 2-CPU instance no CPU is left for read tasks; each worker then "
        "reads its own cases. (Read tasks without a CPU of their own made Ray start, and import into, a "
        "new Python process for nearly every case, as it keeps no idle process beyond the cluster's CPUs: "
        "that took about a quarter of the CPU from the workers and held 1 -> 2 workers at 1.5-1.6x.)",
        "",
        "Per core: the same runs confined to CPUs (every process of the run, Ray's own included, may "
        "use only those; Ray is given that many CPUs). The 1-worker run above has the second core free "
        "for Ray's read tasks, object store and raylet; here it shares its one core with them, as each "
        "worker does when every core runs a worker.",
        "",
        "| engine | workers | cores | steady cases/hour | wall s (all) |",
        "|---|---:|---:|---:|---:|",
        f"| in-process loop | 1 | 1 | {rate['local-core1']:.0f} | {results['local-core1']['wall_s']:.1f} |",
        f"| Ray | 1 | 1 | {rate['ray1-core1']:.0f} | {results['ray1-core1']['wall_s']:.1f} |",
        f"| Ray | 2 | 2 | {rate['ray2']:.0f} | {ray2['wall_s']:.1f} |",
        "",
        f"1 core, 1 worker -> 2 cores, 2 workers: **{rate['ray2'] / rate['ray1-core1']:.2f}x** steady "
        f"(against the in-process loop on 1 core: {rate['ray2'] / rate['local-core1']:.2f}x).",
        "",
        "Reading: confined to one core, where Ray's own processes share the core with the worker (which "
        "reads its own cases, no CPU being left for read tasks), Ray with 1 worker runs at "
        f"{rate['ray1-core1'] / rate['local-core1']:.0%} of the plain loop's rate on that core: Ray's "
        "processes take little CPU (table above). On a GPU node the model's work per case is seconds and "
        "Ray's processes use the CPUs beside the GPUs, so they do not compete with the workers at all.",
        "",
        *busy_note(load_start),
        "## Per-case overhead of the Ray path",
        "",
        f"A job without a model (read the file, write a small JSON atomically), {nm_local['cases']} cases: "
        f"in-process {1000 * per_local:.1f} ms per case, Ray with 1 worker {1000 * per_ray:.1f} ms per case "
        f"(steady, first to last case): **{1000 * (per_ray - per_local):.1f} ms added per case** (a read "
        "task, the object store, one actor call, the driver's bookkeeping). Against the seconds a case "
        f"takes with a model ({3600 / rate['local']:.2f} s here with medsam3-nano on one CPU thread) that "
        f"is {100 * (per_ray - per_local) / (3600 / rate['local']):.2f}%.",
        "",
        "## Driver memory",
        "",
        "| listed cases | driver RSS before the run MiB | driver peak RSS MiB | run s |",
        "|---:|---:|---:|---:|",
        *(
            f"| {m['cases']} | {m['rss_before_mib']:.0f} | {m['peak_rss_mib']:.0f} | {m['run_s']:.1f} |"
            for m in mems
        ),
        "",
        f"From {mems[0]['cases']} to {mems[-1]['cases']} cases the peak grows by "
        f"{mems[-1]['peak_rss_mib'] - mems[0]['peak_rss_mib']:.0f} MiB "
        "(2 workers, the no-model job). The driver holds the list of paths and one small outcome row per "
        "case (for the summary CSV); images never reach it (the read tasks pass them to the workers "
        "through the object store, or the workers read them), and at most `workers + prefetch` cases are "
        "between reading and "
        "writing.",
        "",
        RECIPE,
        "Raw rows: "
        + json.dumps(
            {
                k: {kk: vv for kk, vv in v.items() if kk not in ("stamps", "halves")}
                for k, v in results.items()
                if isinstance(v, dict)
            }
        ),
        "",
    ]
    return "\n".join(lines)


def make_cases(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    images = sorted((DATA / "msd_hippocampus/images").glob("*.nii.gz")) or [SAMPLE]
    for i in range(count):
        shutil.copy(images[i % len(images)], folder / f"case{i:04d}.nii.gz")
    return folder


def make_listed(folder: Path, count: int) -> Path:
    """``count`` small files (symbolic links to one volume) named ``case0000.nii.gz``, ... ."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"case{i:04d}.nii.gz").symlink_to(SAMPLE)
    return folder


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, cases_dir, out, workers, cores, half = sys.argv[2:8]
        print(json.dumps(child(kind, Path(cases_dir), Path(out), int(workers), int(cores), int(half))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="volumes for the throughput runs")
    parser.add_argument("--overhead-cases", type=int, default=200, help="cases for the overhead runs")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "distributed.md")
    args = parser.parse_args()
    import ray

    started = time.time()
    load_start = load_average()
    results: dict = {"ray_version": ray.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = make_cases(root / "cases", args.cases)
        results["local"] = run_child("local", cases, root / "out-local")
        results["ray1"] = run_child("ray", cases, root / "out-ray1", 1)
        results["ray2"] = run_child("ray", cases, root / "out-ray2", 2)
        results["side-by-side"] = run_side_by_side(cases, root / "out-sbs")
        results["ray1-core1"] = run_child("ray", cases, root / "out-ray1c", 1, cores=1)
        results["local-core1"] = run_child("local", cases, root / "out-localc", cores=1)
        small = make_listed(root / "small", args.overhead_cases)
        results["nomodel-local"] = run_child("nomodel-local", small, root / "nm-local")
        results["nomodel-ray1"] = run_child("nomodel-ray", small, root / "nm-ray1", 1)
        for count in MEMORY_COUNTS:
            listed = make_listed(root / f"l{count}", count)
            results[f"mem-{count}"] = run_child("nomodel-ray", listed, root / f"m{count}", 2)
    text = report(results, args, started, load_start)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
