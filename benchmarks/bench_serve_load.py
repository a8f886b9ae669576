"""Bounded load test of ``medsam3 serve`` on the loopback interface.

Starts ``python -m medsam3 serve`` in a subprocess on a free 127.0.0.1 port with a small random SAM3 saved
to a temporary folder (presence head biased to "present", threshold 0, so every job writes a real mask),
uploads two real samples (HC18 ultrasound PNG, Kvasir JPEG), then ``--clients`` threads send
``--requests`` segmentations in total. Each request: ``POST /api/images/{id}/segment`` (a 503 is retried
after its ``Retry-After``, and counted), poll ``GET /api/jobs/{id}`` until done, download the mask and check
that it decodes to the image's shape. Latency is measured from the first submit to the decoded mask.

Everything is bounded: a fixed number of requests, a per-job deadline (``--job-timeout``), an overall
deadline, and the server is stopped at the end. Traffic goes to 127.0.0.1 only.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_serve_load.py [--requests 50] [--clients 10]

Writes ``benchmarks/results/serve_load.md`` (``--append`` adds a run to it; the recorded file holds the
default run and one with ``--queue-size 4``, where clients meet full queues and retry after 503).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import cpu_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONCEPTS = ["fetal head", "skull", "polyp", "mucosa", "lesion"]


def data_root() -> Path:
    return Path(os.environ.get("MEDSAM3_DATA", REPO.parent / "shared" / "data"))


def build_model(folder: Path) -> str:
    import torch
    from transformers import Sam3Model

    from medsam3.model.configs import small_sam3_config
    from medsam3.model.loading import build_processor, save_sam3

    torch.manual_seed(0)
    model = Sam3Model(small_sam3_config()).eval()
    with torch.no_grad():
        model.detr_decoder.presence_head.layer3.bias.fill_(20.0)
    save_sam3(model, build_processor(model.config), folder)
    n = sum(p.numel() for p in model.parameters())
    size = model.config.vision_config.backbone_config.image_size
    return f"random `small_sam3_config()` ({n / 1e6:.1f}M parameters, {size} px)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100)."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1, help="server --workers")
    ap.add_argument("--queue-size", type=int, default=16, help="server --queue-size")
    ap.add_argument("--job-timeout", type=float, default=300.0, help="seconds one request may take")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.md")
    ap.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = ap.parse_args()

    import httpx
    import numpy as np
    from PIL import Image as PILImage

    data = data_root()
    samples = [
        data / "hc18_ultrasound/training_set/000_HC.png",
        data / "kvasir_seg_sample/images/cju0sxqiclckk08551ycbwhno.jpg",
    ]
    for s in samples:
        if not s.is_file():
            raise SystemExit(f"sample {s} not found (set MEDSAM3_DATA)")

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="medsam3-bench-") as tmp:
        model_desc = build_model(Path(tmp) / "model")
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "medsam3",
            "serve",
            "--model",
            str(Path(tmp) / "model"),
            "--device",
            "cpu",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--queue-size",
            str(args.queue_size),
            "--threshold",
            "0",
            "--work-dir",
            str(Path(tmp) / "work"),
        ]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
        log_path = Path(tmp) / "server.log"
        log_file = open(log_path, "wb")  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            client = httpx.Client(base_url=base, timeout=60)
            deadline = time.time() + 120
            while True:
                if server.poll() is not None:
                    raise SystemExit("server exited: " + log_path.read_text(errors="replace")[-2000:])
                try:
                    if client.get("/api/info").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    raise SystemExit("server did not start within 120 s")
                time.sleep(0.2)
            images = []
            for s in samples:
                r = client.post("/api/images", files={"file": (s.name, s.read_bytes())})
                r.raise_for_status()
                images.append((r.json()["image_id"], tuple(r.json()["shape"])))

            latencies: list[float] = []
            failures: list[str] = []
            retries = [0]
            lock = threading.Lock()
            counter = iter(range(args.requests))

            def worker():
                with httpx.Client(base_url=base, timeout=60) as c:
                    while True:
                        with lock:
                            n = next(counter, None)
                        if n is None:
                            return
                        image_id, shape = images[n % len(images)]
                        body = {"prompts": [{"text": CONCEPTS[n % len(CONCEPTS)]}]}
                        t0 = time.perf_counter()
                        end = time.time() + args.job_timeout
                        try:
                            while True:
                                r = c.post(f"/api/images/{image_id}/segment", json=body)
                                if r.status_code != 503:
                                    break
                                with lock:
                                    retries[0] += 1
                                time.sleep(float(r.headers.get("Retry-After", "1")))
                            r.raise_for_status()
                            job_id = r.json()["job_id"]
                            while True:
                                status = c.get(f"/api/jobs/{job_id}").json()
                                if status["status"] in ("done", "failed") or time.time() > end:
                                    break
                                time.sleep(0.05)
                            if status["status"] != "done":
                                raise RuntimeError(f"job {job_id} {status['status']}: {status.get('error')}")
                            got = c.get(f"/api/jobs/{job_id}/mask").content
                            mask = np.asarray(PILImage.open(io.BytesIO(got)))
                            if mask.shape != shape[:2]:
                                raise RuntimeError(f"mask shape {mask.shape} != image {shape}")
                            with lock:
                                latencies.append(time.perf_counter() - t0)
                        except Exception as exc:  # counted and reported, never hidden
                            with lock:
                                failures.append(f"request {n}: {exc}")

            t_start = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.job_timeout * args.requests)
            wall = time.perf_counter() - t_start
            info = client.get("/api/info").json()
            client.close()
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
            log_file.close()

    import torch
    import transformers

    lost = args.requests - len(latencies) - len(failures)
    ms = [v * 1000 for v in latencies]
    lines = [
        "# `medsam3 serve` under load on loopback",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_serve_load.py --requests {args.requests} "
        f"--clients {args.clients} --workers {args.workers} --queue-size {args.queue_size}"
        f"{' --append' if args.append else ''}`",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}), "
        f"transformers {transformers.__version__}",
        f"- server: `python -m medsam3 serve --device cpu --workers {args.workers} --queue-size "
        f"{args.queue_size} --threshold 0` on 127.0.0.1 (uvicorn, one process)",
        f"- model: {model_desc}, fp32, CPU",
        f"- images: `{samples[0].name}` (HC18 PNG 800 x 540) and `{samples[1].name}` (Kvasir JPEG 570 x 531),"
        " uploaded once; requests alternate between them with 5 concepts",
        f"- load: {args.requests} requests from {args.clients} concurrent clients; one request = submit, "
        "poll until done, download and decode the mask",
        "",
        "| requests | ok | failed | lost | 503 retries | p50 ms | p90 ms | p99 ms | max ms | wall s "
        "| jobs/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if ms:
        lines.append(
            f"| {args.requests} | {len(ms)} | {len(failures)} | {lost} | {retries[0]} | "
            f"{percentile(ms, 50):.0f} | {percentile(ms, 90):.0f} | {percentile(ms, 99):.0f} | "
            f"{max(ms):.0f} | "
            f"{wall:.1f} | {len(ms) / wall:.2f} |"
        )
    else:
        lines.append(
            f"| {args.requests} | 0 | {len(failures)} | {lost} | {retries[0]} | - | - | - | - | "
            f"{wall:.1f} | 0 |"
        )
    cache = info["feature_cache"]
    lines += [
        "",
        f"Server counters after the run: {info['queue']['completed']} jobs completed, "
        f"{info['queue']['failed']} failed; vision encoder ran {cache['encoder_calls']} times for "
        f"{args.requests} jobs on 2 images "
        f"(feature cache hits {cache['hits']}, misses {cache['misses']}).",
        "",
        f"Mean latency {statistics.mean(ms):.0f} ms. At most {args.workers} job(s) run at once, so with "
        f"{args.clients} clients the latency is mostly the wait in the queue; the service time per job is "
        f"about {wall / max(len(ms), 1) * args.workers * 1000:.0f} ms (wall time x workers / jobs)."
        if ms
        else "No request succeeded.",
    ]
    if retries[0]:
        lines += [
            "",
            f"{retries[0]} submits met a full queue (503) and were retried after the server's Retry-After "
            "(an estimate: mean job time x jobs ahead / workers, at least 1 s); those waits are part of the "
            "latencies above and make the tail (p99, max) long.",
        ]
    lines += [
        "",
        f"Total run {time.time() - started:.0f} s (model build, server start and the load).",
    ]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in failures[:20]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if args.append and args.out.exists():
        heading = f"## Queue size {args.queue_size}, {args.workers} worker(s)"
        text = args.out.read_text(encoding="utf-8") + "\n" + heading + "\n" + text.split("\n", 1)[1]
    args.out.write_text(text, encoding="utf-8")
    print("\n".join(lines))
    return 0 if not failures and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
