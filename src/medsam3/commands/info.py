"""``medsam3 info FILE_OR_FOLDER``: shape, geometry, orientation, modality, intensities and labels.

Reads only; writes nothing. Label names and where they came from: :mod:`medsam3.info`. Errors
(unreadable file, several DICOM series without ``--series``) exit with status 2 through the CLI's error
handling.
"""

from __future__ import annotations

import argparse
import json

from medsam3.info import describe, format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe an image, volume, DICOM series or label map",
        description="Describe an image, volume, DICOM series folder or label map: shape, spacing, origin, "
        "direction and orientation (ITK order, LPS), modality, dtype, intensity range, and for label maps "
        "the labels with names, voxel counts, volumes and colours. Label names come from the file (NIfTI "
        "header extension, Slicer segment fields, npz label_names, DICOM SEG segment labels) or from a JSON "
        "sidecar beside it (X_seg.json for X_seg.nii.gz); the output says which.",
    )
    p.add_argument("path", metavar="FILE_OR_FOLDER", help="image file, DICOM series folder or label map")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--labels",
        action="store_true",
        help="treat the input as a label map: value, name, voxels, volume (ml) and colour of each label",
    )
    p.add_argument("--series", metavar="UID", help="Series Instance UID to read from a multi-series folder")
    p.add_argument("--modality", metavar="M", help="override the guessed modality (CT, MR, PT, US, XR, ...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = describe(args.path, labels=args.labels, series_uid=args.series, modality=args.modality)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_table(info))
    return 0
