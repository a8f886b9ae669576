"""Training components for SAM3 / Medical SAM3 fine-tuning.

* :mod:`medsam3.train.matcher` - one-to-one (Hungarian) and one-to-many query-to-target matchers.
* :mod:`medsam3.train.losses` - :class:`Sam3Loss` (SAM3's detection + segmentation loss, configured by
  :class:`LossConfig`), :class:`SimpleSegLoss` (a compact mask-only alternative) and
  :func:`global_num_targets` (loss normaliser averaged over processes).
* :mod:`medsam3.train.losses_find` / :mod:`medsam3.train.losses_seg` - the individual loss terms.
* :mod:`medsam3.train.decoder_layers` - per-layer decoder predictions of a ``Sam3Model`` for the
  auxiliary losses.

Conventions: predicted boxes are xyxy normalised (transformers ``Sam3Model``), target boxes cxcywh
normalised, masks in the model input frame (row = y, column = x).
"""

from medsam3.train.decoder_layers import DecoderLayers, record_decoder_layers
from medsam3.train.losses import LossConfig, Sam3Loss, SimpleSegLoss, global_num_targets
from medsam3.train.matcher import HungarianMatcher, OneToManyMatcher

__all__ = [
    "DecoderLayers",
    "HungarianMatcher",
    "LossConfig",
    "OneToManyMatcher",
    "Sam3Loss",
    "SimpleSegLoss",
    "global_num_targets",
    "record_decoder_layers",
]
