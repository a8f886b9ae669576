"""Shared pieces of the video-model tests: thresholds that keep every detection, and the new objects a
video model creates on a session's first frame."""

from __future__ import annotations

import torch

from medsam3.model.configs import OPEN_VIDEO_THRESHOLDS

#: Video-model settings under which a tiny random model keeps its detections and tracks them.
OPEN_THRESHOLDS = OPEN_VIDEO_THRESHOLDS


def first_frame_new_objects(model, session) -> tuple[list[int], torch.Tensor]:
    """Run frame 0 of ``session`` with Meta's behaviour installed; the ids of the objects created there and
    their detection logits ``(N, low_res, low_res)``, in creation order."""
    from medsam3.model.video_meta import meta_video_behaviour

    seen = {}
    original = model.run_tracker_update_execution_phase

    def spy(inference_session, frame_idx, det_out, tracker_update_plan, reverse=False):
        seen["logits"] = det_out["mask"][tracker_update_plan["new_det_out_inds"]].clone()
        return original(inference_session, frame_idx, det_out, tracker_update_plan, reverse=reverse)

    model.run_tracker_update_execution_phase = spy
    try:
        with meta_video_behaviour(model):
            model(inference_session=session, frame_idx=0)
    finally:
        del model.run_tracker_update_execution_phase
    return list(session.obj_ids), seen["logits"]
