"""Training data: dataset folders as users have them -> one manifest of image/label/concept records.

Flow: a layout reader (:mod:`~medsam3.data.layouts`: nnU-Net/MSD, folders of image/mask pairs, BiomedSegFM
``.npz``, COCO) finds the pairs; :mod:`~medsam3.data.indexing` checks geometry and label values, maps label
names to canonical concepts (:mod:`~medsam3.data.vocabulary`), records where each concept is present and
assigns the 85/15 split (:mod:`~medsam3.data.splits`); :mod:`~medsam3.data.manifest` reads and writes the
JSONL manifest; :mod:`~medsam3.data.sampler` draws balanced (record, slice, concept, negative) training items.
:mod:`~medsam3.data.registry` knows the paper's 40 datasets. ``medsam3 prepare`` drives it all.
"""

from medsam3.data.indexing import DatasetReport, prepare_dataset
from medsam3.data.labels import LabelArrays, concept_target, load_label_arrays
from medsam3.data.manifest import Record, check_records, read_manifest, write_manifest
from medsam3.data.splits import split_dataset
from medsam3.data.vocabulary import Vocabulary, normalize_term

__all__ = [
    "DatasetReport",
    "LabelArrays",
    "Record",
    "Vocabulary",
    "check_records",
    "concept_target",
    "load_label_arrays",
    "normalize_term",
    "prepare_dataset",
    "read_manifest",
    "split_dataset",
    "write_manifest",
]
