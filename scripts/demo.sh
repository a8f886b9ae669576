#!/usr/bin/env bash
# The main job on the bundled samples (MSD hippocampus MRI volume, HC18 fetal-head ultrasound):
# set up if needed, describe the inputs, write preprocessing previews with the reference labels, and,
# when a model is available (--model / MEDSAM3_MODEL / config file / bundled model), segment them by
# text prompt and print the Dice against the sample's reference. Outputs go to ./outputs/demo (or $1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
OUT=${1:-outputs/demo}
M=.venv/bin/medsam3
S=$(.venv/bin/python -c "import medsam3, pathlib; print(pathlib.Path(medsam3.__file__).parent / 'assets' / 'samples')")
mkdir -p "$OUT"

echo "== hippocampus MRI volume (MSD Task04, CC BY-SA 4.0) =="
$M info "$S/hippocampus_019.nii.gz"
$M info --labels "$S/hippocampus_019_labels.nii.gz"
$M preview "$S/hippocampus_019.nii.gz" --labels "$S/hippocampus_019_labels.nii.gz" \
  --label-names "$S/hippocampus_019_labels.json" -o "$OUT/hippocampus_preview"

echo "== fetal head ultrasound (HC18, CC BY 4.0) =="
$M info "$S/hc18_400_HC.png"
$M preview "$S/hc18_400_HC.png" --modality US --labels "$S/hc18_400_HC_mask.png" \
  --label-names "$S/hc18_400_HC_mask.json" -o "$OUT/fetal_head_preview"

echo "== segmentation by text prompt =="
if .venv/bin/python -c "from medsam3.model.resolve import resolve_model; resolve_model(None)" 2>/dev/null; then
  $M segment "$S/hc18_400_HC.png" -p "fetal head" --modality US -o "$OUT/fetal_head"
  .venv/bin/python scripts/demo_dice.py "$OUT/fetal_head/hc18_400_HC_mask.png" "$OUT/fetal_head/hc18_400_HC.json" \
    "$S/hc18_400_HC_mask.png" "$S/hc18_400_HC_mask.json"
  # the same with test-time mirroring (the image and its mirrors along x, y and both, averaged)
  $M segment "$S/hc18_400_HC.png" -p "fetal head" --modality US --tta -o "$OUT/fetal_head_tta"
  .venv/bin/python scripts/demo_dice.py "$OUT/fetal_head_tta/hc18_400_HC_mask.png" \
    "$OUT/fetal_head_tta/hc18_400_HC.json" "$S/hc18_400_HC_mask.png" "$S/hc18_400_HC_mask.json"
  $M segment "$S/hippocampus_019.nii.gz" -p "anterior hippocampus" -p "posterior hippocampus" -o "$OUT/hippocampus"
  .venv/bin/python scripts/demo_dice.py "$OUT/hippocampus/hippocampus_019_seg.nii.gz" "$OUT/hippocampus/hippocampus_019.json" \
    "$S/hippocampus_019_labels.nii.gz" "$S/hippocampus_019_labels.json"
  # the whole hippocampus (anterior + posterior, labels 1 and 2) from one prompt
  $M segment "$S/hippocampus_019.nii.gz" -p "hippocampus" -o "$OUT/hippocampus_whole"
  .venv/bin/python scripts/demo_dice.py "$OUT/hippocampus_whole/hippocampus_019_seg.nii.gz" \
    "$OUT/hippocampus_whole/hippocampus_019.json" "$S/hippocampus_019_labels.nii.gz" \
    "$S/hippocampus_019_labels.json" "hippocampus=1,2"
else
  echo "no model is available (no --model, MEDSAM3_MODEL, config file or bundled model): segmentation skipped."
  echo "Convert a checkpoint with 'medsam3 convert sam3.pt models/sam3' and set MEDSAM3_MODEL=models/sam3."
fi

echo "outputs in $OUT"
