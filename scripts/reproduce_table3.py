#!/usr/bin/env python
"""Reproduce Table 3 of the Medical SAM3 paper: vanilla SAM3 vs Medical SAM3, text prompts only.

    python scripts/reproduce_table3.py --data-root ROOT --vanilla SAM3_DIR --medical MEDSAM3_DIR -o OUT

ROOT holds one folder per evaluation dataset, named like its registry entry (``medsam3 prepare --list``):
PS-FH-AOP-2023, DRIVE, COph100, Breast Cancer Segmentation, Intraretinal Cystoid Fluid, m2caiSeg,
FetoPlac, GlaS 2015, SegThy, PAPILA (internal: their 15% validation split, seed 42) and TN3K, HC18,
CVC-ClinicDB, ETIS-Larib, PH2, CHASE_DB1, STARE (external: every case). OUT receives the evaluation report
(``medsam3 evaluate``) and ``table3.md`` / ``table3.csv`` with the paper's numbers beside ours.
Same as ``medsam3 evaluate --table3 ...``.
"""

import sys

from medsam3.evaluate.table3 import main

if __name__ == "__main__":
    sys.exit(main())
