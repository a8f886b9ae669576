"""A series from a DICOMweb server as a local case, and the DICOM results to store back.

:func:`downloaded_series` puts the series in a temporary folder named by its Series Instance UID (so the
outputs are ``<SeriesInstanceUID>_seg.nii.gz``, ``..._seg.dcm``, ...) and removes the folder afterwards,
also on error: the local outputs are written only after the whole series arrived and was read.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from medsam3.errors import OptionError, OutputError
from medsam3.pacs.dicomweb import SeriesRef, Server, base_url, check_uid, parse_series_url

#: Output kinds that are DICOM objects a PACS stores (``write_volume_result``'s keys).
STORABLE = ("dicom_seg", "rtstruct")
#: ``--output-type`` values that produce them.
STORABLE_TYPES = ("dicom-seg", "rtstruct")


def series_ref(
    source: str | Path | None, dicomweb: str | None, study: str | None, series: str | None
) -> SeriesRef | None:
    """The remote series named by a ``dicomweb+`` URL input or by ``--dicomweb ROOT --study --series``.

    Returns ``None`` for a local input. Raises :class:`OptionError` for an incomplete or doubled naming.
    """
    url = source if isinstance(source, str) and source.lower().startswith("dicomweb+") else None
    given = [name for name, value in (("--study", study), ("--series", series)) if value]
    if dicomweb is None:
        if given:
            raise OptionError(f"{' and '.join(given)} name a series on a server given with --dicomweb ROOT")
        return parse_series_url(url) if url else None
    if url is not None or source is not None:
        raise OptionError("give the series either as a dicomweb+ URL input or with --dicomweb, not both")
    if len(given) != 2:
        raise OptionError("--dicomweb ROOT needs --study UID and --series UID")
    assert study is not None and series is not None
    return SeriesRef(base_url(dicomweb), check_uid(study, "study"), check_uid(series, "series"))


def store_target(store: str | None, source: SeriesRef | None) -> str | None:
    """The DICOMweb root results go to: ``--store`` alone means the source series' server."""
    if store is None:
        return None
    if store == "source":
        if source is None:
            raise OptionError("--store without a server needs a DICOMweb input; give --store ROOT_URL")
        return source.base_url
    return base_url(store)


def check_storable(output_types: list[str] | None) -> None:
    """Refuse ``--store`` when the chosen outputs hold no DICOM object (before any work)."""
    if output_types is not None and not set(output_types) & set(STORABLE_TYPES):
        raise OptionError(
            "--store sends DICOM objects; add dicom-seg and/or rtstruct to --output-type "
            f"(given: {', '.join(output_types)})"
        )


def results_to_store(paths: Mapping[str, Path]) -> list[Path]:
    """The DICOM result files among a case's outputs; :class:`OutputError` when there is none."""
    files = [paths[kind] for kind in STORABLE if kind in paths]
    if not files:
        raise OutputError(
            "nothing to store: this case has no DICOM SEG or RTSTRUCT (a 2D image gets a PNG mask; an "
            "anonymised series without UIDs gets no DICOM SEG, see the case's JSON)"
        )
    return files


@contextlib.contextmanager
def downloaded_series(server: Server, ref: SeriesRef) -> Iterator[Path]:
    """A temporary folder ``<tmp>/<SeriesInstanceUID>`` holding the series; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="medsam3-dicomweb-") as tmp:
        folder = Path(tmp) / ref.series_uid
        server.download_series(ref, folder)
        yield folder
