"""Wall time of ``import medsam3`` in a fresh interpreter, against importing what its lazy names load.

``import medsam3`` loads only the image type and the errors; ``medsam3.segment``, ``Segmenter`` and the
other names that need torch and transformers are imported on first use. The obvious alternative, importing
them eagerly at ``import medsam3``, costs what ``import medsam3.api`` costs (torch, transformers, the
engine). Each row is the median and minimum of ``--runs`` fresh interpreters.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/import_time.py [--runs 7]

Prints a Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

import numpy as np

CASES = {
    "import medsam3 (lazy names)": "import medsam3",
    "import medsam3; medsam3.Segmenter (first use)": "import medsam3; medsam3.Segmenter",
    "import medsam3.api (eager alternative)": "import medsam3.api",
    "import torch (for scale)": "import torch",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for name, code in CASES.items():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
            times.append(time.perf_counter() - start)
        rows.append((name, float(np.median(times)), float(np.min(times))))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{args.runs} fresh interpreters per row (interpreter start-up included)\n"
    )
    print("| import | median s | min s |\n|---|---|---|")
    for name, med, low in rows:
        print(f"| `{name}` | {med:.3f} | {low:.3f} |")


if __name__ == "__main__":
    main()
