#!/usr/bin/env bash
# Reproduce the bundled compact model medsam3-nano end to end, on a CPU:
#   1. prepare: manifests of the public samples with the fixed split configs/nano_split.json (held-out
#      cases are split "test"; they include the bundled samples hippocampus_019 and 400_HC):
#        manifest.jsonl            the samples as they are labelled;
#        manifest_negatives.jsonl  the same, except that the hippocampus volumes also name "fetal head" and
#                                  "polyp" (values that never occur), so those are drawn as negatives on MR;
#        manifest_regions.jsonl    the same as manifest.jsonl plus the region "hippocampus" (labels 1 + 2);
#   2. train: stage 1, `medsam3 train configs/nano.yaml` from random weights (seed 42) on manifest.jsonl;
#      stage 2, `medsam3 train configs/nano_stage2.yaml` from the stage-1 export on manifest_negatives.jsonl;
#      stage 3, the same recipe once more from the stage-2 export (fresh optimizer, warm-up, cool-down);
#      stage 4, `medsam3 train configs/nano_stage4.yaml` from the stage-3 export on manifest_regions.jsonl,
#      with data augmentation, the score-aware SimpleSegLoss and cross-group negatives on every dataset;
#      stage 5, `medsam3 train configs/nano_stage5.yaml` from the stage-4 export: lower learning rate, more
#      cross-group negatives;
#      stage 6, `medsam3 train configs/nano_stage6.yaml` from the stage-5 export at 336 px instead of 224 px
#      (model.image_size: the position embedding is resampled to the larger grid);
#      stage 8, `medsam3 train configs/nano_stage8.yaml` from the stage-6 export rounded to float16 (what
#      was bundled before stage 8 existed) on manifest_ood.jsonl: wider zoom range, more flips and
#      rotation, datasets drawn in proportion to their images (the small fetal heads), and negatives from
#      other modalities (below);
#   3. bundle: the stage-8 model in float16 into src/medsam3/assets/models/medsam3-nano (config, weights,
#      tokenizer and processor files, concepts.json, the concepts it knows, and domain.safetensors, its
#      training domain, fitted by scripts/nano_domain.py; LICENSE.md and MODEL_CARD.md there are kept);
#   4. evaluate (only when asked, see NANO_STAGES): the bundled model on the held-out cases -> WORK_DIR/eval,
#      and again with test-time mirroring (medsam3 evaluate --tta) -> WORK_DIR/eval_tta.
#   Negatives from other modalities (stage 8): prepare also writes manifest_ood.jsonl, manifest_regions.jsonl
#   plus one negative-only record per item of the `training_pool` of configs/nano_ood_heldout.json
#   (scripts/nano_negatives.py: licences checked, the held-out images of the out-of-domain benchmark
#   excluded; each item names the five known concepts as absent, so that training draws them as negatives).
#   Stage 7 (only when asked: NANO_STAGES="stage7", an earlier experiment, not bundled): the same negatives
#   with endoscopy-like augmentation (configs/nano_stage7.yaml), 300 steps from the bundled model
#   (NANO_STAGE7_SOURCE to start from another folder, e.g. WORK_DIR/stage6/export/float16) on
#   manifest_ood.jsonl -> WORK_DIR/stage7; bundle7 puts it into the bundle (as step 3). Compare first
#   (benchmarks/results/nano_ood.md): python benchmarks/nano_ood_matrix.py DATA_DIR
#   --model before=BUNDLE --model after=WORK_DIR/stage7/export/final
#
# Usage (from the repository root, with the package installed):
#   scripts/train_nano.sh DATA_DIR [WORK_DIR]
#     DATA_DIR  folder holding hc18_ultrasound/, msd_hippocampus/ and kvasir_seg_sample/
#     WORK_DIR  manifests and run folders (default outputs/nano; never inside DATA_DIR)
#   Environment: NANO_STAGES (default "prepare train bundle"; add "evaluate"; "stage8" runs stage 8 alone,
#   from WORK_DIR/stage6), NANO_STEPS1 ... NANO_STEPS6 and NANO_STEPS8 (optimizer steps of the seven
#   stages, default 1000 / 1200 / 900 / 4000 / 1500 / 1000 / 600), NANO_STEPS7 (default 300),
#   NANO_STAGE7_SOURCE (default: the bundled model), NANO_STAGE7_MINUTES (default none: stop stage 7 with a
#   checkpoint after so many minutes of training; running again continues it), NANO_EVAL_MODEL (the model
#   folder that evaluate scores; default the bundle), NANO_BUNDLE (the folder bundle writes; default
#   src/medsam3/assets/models/medsam3-nano).
# Running it again resumes an interrupted stage from its run folder's checkpoints/last.pt.
set -euo pipefail

DATA=${1:?usage: scripts/train_nano.sh DATA_DIR [WORK_DIR]}
WORK=${2:-outputs/nano}
STEPS1=${NANO_STEPS1:-1000}
STEPS2=${NANO_STEPS2:-1200}
STEPS3=${NANO_STEPS3:-900}
STEPS4=${NANO_STEPS4:-4000}
STEPS5=${NANO_STEPS5:-1500}
STEPS6=${NANO_STEPS6:-1000}
STEPS7=${NANO_STEPS7:-300}
STEPS8=${NANO_STEPS8:-600}
STAGES=${NANO_STAGES:-prepare train bundle}
BUNDLE=${NANO_BUNDLE:-src/medsam3/assets/models/medsam3-nano}
SOURCE7=${NANO_STAGE7_SOURCE:-$BUNDLE}
MINUTES7=${NANO_STAGE7_MINUTES:-null}
EVAL_MODEL=${NANO_EVAL_MODEL:-$BUNDLE}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

mkdir -p "$WORK"
printf '{"1": "fetal head"}\n' > "$WORK/labels_hc18.json"
printf '{"1": "anterior hippocampus", "2": "posterior hippocampus"}\n' > "$WORK/labels_hippocampus.json"
printf '{"1": "anterior hippocampus", "2": "posterior hippocampus", "3": "fetal head", "4": "polyp"}\n' \
  > "$WORK/labels_hippocampus_negatives.json"
printf '{"1": "polyp"}\n' > "$WORK/labels_kvasir.json"
printf '{"anterior hippocampus": 1, "posterior hippocampus": 2, "hippocampus": [1, 2]}\n' \
  > "$WORK/labels_hippocampus_regions.json"

# prepare_manifest NAME HIPPOCAMPUS_LABELS [prepare options...]: WORK/NAME.jsonl of the three datasets.
prepare_manifest() {
  local name=$1 hippocampus_labels=$2
  shift 2
  local manifest=$WORK/$name.jsonl splits=$WORK/$name.splits.json
  rm -f "$manifest"
  # `medsam3 prepare` rewrites the splits file it is given: work on a copy of the fixed split.
  cp configs/nano_split.json "$splits"
  medsam3 prepare --layout folder2d --root "$DATA/hc18_ultrasound" --name HC18 "$@" \
    --images 'training_set/*_HC.png' --mask '{stem}_Annotation.png' --mask-mode binary \
    --labels "$WORK/labels_hc18.json" --modality US --splits "$splits" -o "$manifest"
  medsam3 prepare --layout folder2d --root "$DATA/msd_hippocampus" --name MSD-Hippocampus "$@" \
    --images 'images/*.nii.gz' --mask '../labels/{stem}.nii.gz' --mask-mode values \
    --labels "$hippocampus_labels" --modality MR --splits "$splits" -o "$manifest"
  medsam3 prepare --layout folder2d --root "$DATA/kvasir_seg_sample" --name Kvasir-SEG "$@" \
    --images 'images/*.jpg' --mask '../masks/{stem}.jpg' --mask-mode binary --threshold 127 \
    --labels "$WORK/labels_kvasir.json" --modality RGB --splits "$splits" -o "$manifest"
  # The prepared split must be the fixed one (no case added or moved).
  python - "$splits" configs/nano_split.json <<'PY'
import json, sys
a, b = (json.load(open(p))["datasets"] for p in sys.argv[1:3])
norm = lambda d: {k: {s: sorted(v) for s, v in parts.items()} for k, parts in d.items()}
if norm(a) != norm(b):
    sys.exit(f"error: the prepared split {sys.argv[1]} differs from {sys.argv[2]}")
PY
}

if [[ " $STAGES " == *" prepare "* ]]; then
  prepare_manifest manifest "$WORK/labels_hippocampus.json"
  prepare_manifest manifest_negatives "$WORK/labels_hippocampus_negatives.json"
  prepare_manifest manifest_regions "$WORK/labels_hippocampus_regions.json"
  # stage 7: manifest_regions.jsonl plus the negatives from other modalities
  python scripts/nano_negatives.py "$DATA" "$WORK" --heldout configs/nano_ood_heldout.json \
    --base "$WORK/manifest_regions.jsonl" -o "$WORK/manifest_ood.jsonl"
fi

if [[ " $STAGES " == *" train "* ]]; then
  medsam3 train configs/nano.yaml data.manifest="$WORK/manifest.jsonl" run_dir="$WORK/stage1" \
    max_steps="$STEPS1"
  medsam3 train configs/nano_stage2.yaml model.source="$WORK/stage1/export/final" \
    data.manifest="$WORK/manifest_negatives.jsonl" run_dir="$WORK/stage2" max_steps="$STEPS2"
  medsam3 train configs/nano_stage2.yaml model.source="$WORK/stage2/export/final" \
    data.manifest="$WORK/manifest_negatives.jsonl" run_dir="$WORK/stage3" max_steps="$STEPS3"
  medsam3 train configs/nano_stage4.yaml model.source="$WORK/stage3/export/final" \
    data.manifest="$WORK/manifest_regions.jsonl" run_dir="$WORK/stage4" max_steps="$STEPS4"
  medsam3 train configs/nano_stage5.yaml model.source="$WORK/stage4/export/final" \
    data.manifest="$WORK/manifest_regions.jsonl" run_dir="$WORK/stage5" max_steps="$STEPS5"
  medsam3 train configs/nano_stage6.yaml model.source="$WORK/stage5/export/final" \
    data.manifest="$WORK/manifest_regions.jsonl" run_dir="$WORK/stage6" max_steps="$STEPS6"
fi

# half_model SOURCE TARGET: the model folder SOURCE with its weights rounded to float16 (a new folder
# TARGET, replaced if it exists), with the concepts it knows (concepts.json, written by medsam3 train).
half_model() {
  rm -rf "$2"
  python - "$1" "$2" <<'PY'
import sys
import torch
from medsam3.model.loading import load_sam3, save_sam3

loaded = load_sam3(sys.argv[1], device="cpu", dtype="fp32")
save_sam3(loaded.model.to(torch.float16), loaded.processor, sys.argv[2])
PY
  cp "$1/concepts.json" "$2/"
}

if [[ " $STAGES " == *" train "* || " $STAGES " == *" stage8 "* ]]; then
  # stage 8 starts from the stage-6 model as it was bundled: weights rounded to float16
  half_model "$WORK/stage6/export/final" "$WORK/stage6/export/float16"
  medsam3 train configs/nano_stage8.yaml model.source="$WORK/stage6/export/float16" \
    data.manifest="$WORK/manifest_ood.jsonl" run_dir="$WORK/stage8" max_steps="$STEPS8"
fi

# bundle_model STAGE: the export of WORK/STAGE in float16 into the bundle folder.
bundle_model() {
  local stage=$1
  # the weights in float16 and the concepts the model knows (prompts outside them are reported as
  # unknown concepts)
  half_model "$WORK/$stage/export/final" "$BUNDLE.new"
  # its training domain: a known concept on an image unlike its training images is reported absent
  python scripts/nano_domain.py "$BUNDLE.new" "$DATA"
  mkdir -p "$BUNDLE"
  for f in "$BUNDLE.new"/*; do mv -f "$f" "$BUNDLE/"; done
  rmdir "$BUNDLE.new"
  ls -l "$BUNDLE"
}

if [[ " $STAGES " == *" bundle "* ]]; then
  bundle_model stage8
fi

# stage 7 starts from the bundle (written just above when bundle is among the stages)
if [[ " $STAGES " == *" stage7 "* ]]; then
  medsam3 train configs/nano_stage7.yaml model.source="$SOURCE7" data.manifest="$WORK/manifest_ood.jsonl" \
    run_dir="$WORK/stage7" max_steps="$STEPS7" stop_after_minutes="$MINUTES7"
fi

if [[ " $STAGES " == *" bundle7 "* ]]; then
  bundle_model stage7
fi

if [[ " $STAGES " == *" evaluate "* ]]; then
  # benchmarks/results/nano_eval.md. This manifest puts the three datasets in one modality group, so that
  # `--absent 3` prompts each held-out image with the concepts of the two other datasets.
  prepare_manifest eval_manifest "$WORK/labels_hippocampus_regions.json" --group all
  # Twice: as the model is (WORK/eval), and with test-time mirroring (--tta: the image and its mirrors along
  # x, y and both, predictions averaged; WORK/eval_tta).
  for tta in "" --tta; do
    out=$WORK/eval${tta:+_tta}
    rm -rf "$out"
    medsam3 evaluate --manifest "$WORK/eval_manifest.jsonl" --model "$EVAL_MODEL" --model-name medsam3-nano \
      --prompt-mode text --split test --absent 3 --presence-threshold 0.5 --volume-mode volume --gallery 0 \
      --device cpu --dtype fp32 $tta -o "$out"
  done
fi
