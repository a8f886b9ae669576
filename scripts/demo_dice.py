"""Print the Dice of a medsam3 segmentation against a reference label map, per concept.

Usage: python scripts/demo_dice.py PRED_LABELS PRED_JSON REFERENCE REFERENCE_NAMES_JSON [CONCEPT=V1,V2 ...]

PRED_JSON is the summary ``medsam3 segment`` writes beside the label map (label value -> concept);
REFERENCE_NAMES_JSON maps the reference's label values to concepts (``{"1": "fetal head"}``);
``CONCEPT=V1,V2`` scores a region instead: the concept against the union of those reference values
(``hippocampus=1,2``), in place of the names file's concepts. Concepts are matched by name; a concept the
model reported absent scores 0 when the reference has it.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from medsam3.evaluate.metrics import dice
from medsam3.io.readers import read_label_map


def main(pred_path: str, pred_json: str, ref_path: str, ref_names_json: str, *regions: str) -> int:
    ref = read_label_map(ref_path)
    pred = read_label_map(pred_path, reference=ref)
    summary = json.load(open(pred_json, encoding="utf-8"))
    predicted = {e["name"]: int(e["value"]) for e in summary["labels"] if not e.get("absent")}
    ref_names = {(int(k),): v for k, v in json.load(open(ref_names_json, encoding="utf-8")).items()}
    if regions:
        ref_names = {}
        for spec in regions:
            concept, _, values = spec.partition("=")
            ref_names[tuple(int(v) for v in values.split(","))] = concept
    for values, concept in sorted(ref_names.items()):
        ref_mask = np.isin(np.asarray(ref.array), values)
        pred_value = predicted.get(concept)
        if pred_value is None:
            pred_mask = np.zeros_like(ref_mask)
        else:
            pred_mask = np.asarray(pred.array) == pred_value
        note = "" if pred_value is not None else "  (reported absent)"
        print(f"  Dice {concept:<24} {dice(pred_mask, ref_mask):.3f}{note}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
