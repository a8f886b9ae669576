"""Training components for SAM3 / Medical SAM3 fine-tuning.

* :mod:`medsam3.train.matcher` - one-to-one (Hungarian) and one-to-many query-to-target matchers.
* :mod:`medsam3.train.losses` - :class:`Sam3Loss` (SAM3's detection + segmentation loss, configured by
  :class:`LossConfig`), :class:`SimpleSegLoss` (a compact mask-only alternative) and
  :func:`global_num_targets` (loss normaliser averaged over processes).
* :mod:`medsam3.train.losses_find` / :mod:`medsam3.train.losses_seg` - the individual loss terms.
* :mod:`medsam3.train.decoder_layers` - per-layer decoder predictions of a ``Sam3Model`` for the
  auxiliary losses.
* :mod:`medsam3.train.config` - :class:`TrainConfig` and :func:`build_config` (YAML overrides + key=value).
* :mod:`medsam3.train.optim` - parameter groups with the paper's learning rates and layer-wise decay,
  warm-up + inverse-square-root schedule.
* :mod:`medsam3.train.model` - :func:`build_model` (the ``Sam3Model`` to train) and the training forward.
* :mod:`medsam3.train.loop` - :func:`train` on accelerate (DDP / FSDP), resumable checkpoints, export.

Conventions: predicted boxes are xyxy normalised (transformers ``Sam3Model``), target boxes cxcywh
normalised, masks in the model input frame (row = y, column = x).
"""

from medsam3.train.config import TrainConfig, build_config
from medsam3.train.decoder_layers import DecoderLayers, record_decoder_layers
from medsam3.train.losses import LossConfig, Sam3Loss, SimpleSegLoss, global_num_targets
from medsam3.train.matcher import HungarianMatcher, OneToManyMatcher

__all__ = [
    "TrainConfig",
    "build_config",
    "train",
    "DecoderLayers",
    "HungarianMatcher",
    "LossConfig",
    "OneToManyMatcher",
    "Sam3Loss",
    "SimpleSegLoss",
    "global_num_targets",
    "record_decoder_layers",
]


def __getattr__(name: str):
    # the loop imports accelerate; load it only when asked for
    if name == "train":
        from medsam3.train.loop import train

        return train
    raise AttributeError(name)
