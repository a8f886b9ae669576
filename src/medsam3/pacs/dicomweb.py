"""DICOMweb: name a series on a server, download it to a folder, store DICOM files back.

A series is named by a URL ``dicomweb+http(s)://HOST[:PORT]/ROOT/studies/STUDY_UID/series/SERIES_UID``
(:func:`parse_series_url`), ``ROOT`` being the server's DICOMweb root (``/dicom-web`` for Orthanc's plugin,
``/dcm4chee-arc/aets/DCM4CHEE/rs`` for dcm4chee). The requests go through ``dicomweb-client``:

* QIDO-RS lists the series' instances (their SOP Instance UIDs): an empty answer means the series is not on
  the server;
* WADO-RS retrieves the series as stored (``transfer-syntax=*``: compressed series stay compressed and are
  decoded locally, so the server need not transcode), streamed instance by instance into a folder, with a
  byte cap (:data:`MAX_DOWNLOAD_ENV`); the download is complete only when every listed instance arrived;
* STOW-RS stores files (the DICOM SEG, the RTSTRUCT) in the study they reference; the server's answer is
  checked instance by instance.

Credentials never appear on the command line: a bearer token from ``MEDSAM3_DICOMWEB_TOKEN``, or basic
auth from ``MEDSAM3_DICOMWEB_USER`` and ``MEDSAM3_DICOMWEB_PASSWORD`` (:func:`session_from_env`); a URL with
``user:password@`` is refused. Every failure (server down, 401/403, 404, a cut download, a refused store)
is a :class:`~medsam3.errors.MedSam3Error` naming the server and the series.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from medsam3.errors import MedSam3Error, OutputError

log = logging.getLogger(__name__)

TOKEN_ENV = "MEDSAM3_DICOMWEB_TOKEN"
USER_ENV = "MEDSAM3_DICOMWEB_USER"
PASSWORD_ENV = "MEDSAM3_DICOMWEB_PASSWORD"
#: Largest series download in MiB (default 4096); the download stops with an error beyond it.
MAX_DOWNLOAD_ENV = "MEDSAM3_MAX_DOWNLOAD_MB"
DEFAULT_MAX_DOWNLOAD_MB = 4096
#: Connect and read timeouts of every request, seconds.
TIMEOUT = (10.0, 300.0)

_UID = r"[0-9]+(?:\.[0-9]+)*"
_SERIES_PATH = re.compile(rf"^(?P<root>.*?)/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/?$")

T = TypeVar("T")


class DicomwebError(MedSam3Error):
    """A DICOMweb request failed: server unreachable, refused credentials, unknown series, cut download."""


@dataclass(frozen=True)
class SeriesRef:
    """A series on a DICOMweb server.

    Attributes:
        base_url: the server's DICOMweb root as ``http(s)://HOST[:PORT]/ROOT`` (no trailing slash).
        study_uid, series_uid: the Study and Series Instance UIDs.
    """

    base_url: str
    study_uid: str
    series_uid: str

    @property
    def url(self) -> str:
        """The ``dicomweb+http(s)://...`` URL naming this series."""
        return f"dicomweb+{self.base_url}/studies/{self.study_uid}/series/{self.series_uid}"

    def __str__(self) -> str:
        return self.url


def is_dicomweb_url(text: str | os.PathLike) -> bool:
    """True for a ``dicomweb+http://`` or ``dicomweb+https://`` URL."""
    return str(text).lower().startswith(("dicomweb+http://", "dicomweb+https://"))


def base_url(text: str) -> str:
    """The DICOMweb root ``http(s)://HOST[:PORT]/ROOT`` from ``text`` (with or without ``dicomweb+``).

    Raises:
        DicomwebError: not an http(s) URL, no host, or credentials written into the URL.
    """
    raw = text[len("dicomweb+") :] if text.lower().startswith("dicomweb+") else text
    shown = _redacted(text)
    if _USERINFO.search(raw):
        raise DicomwebError(
            f"{shown}: credentials in the URL are refused (they would show in process lists and logs); "
            f"set {TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}"
        )
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise DicomwebError(f"{shown!r} is not a DICOMweb URL (expected http(s)://HOST[:PORT]/ROOT)")
    if parts.query or parts.fragment:
        raise DicomwebError(f"{shown!r}: a DICOMweb root takes no query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise DicomwebError(f"{shown!r}: the port is not a number from 0 to 65535") from None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def parse_series_url(text: str) -> SeriesRef:
    """The series named by ``dicomweb+http(s)://HOST[:PORT]/ROOT/studies/UID/series/UID``.

    Raises:
        DicomwebError: another form, a malformed UID, or credentials in the URL.
    """
    if not is_dicomweb_url(text):
        raise DicomwebError(f"{text!r} is not a dicomweb+http(s):// URL")
    root = base_url(text.split("/studies/", 1)[0])
    path = urlsplit(text[len("dicomweb+") :]).path
    match = _SERIES_PATH.match(path)
    if match is None:
        raise DicomwebError(
            f"{text!r}: expected dicomweb+http(s)://HOST[:PORT]/ROOT/studies/STUDY_UID/series/SERIES_UID"
        )
    return SeriesRef(root, check_uid(match["study"], "study"), check_uid(match["series"], "series"))


def check_uid(uid: str, what: str) -> str:
    """``uid`` when it is a valid DICOM UID (digits and dots, at most 64 characters)."""
    if (
        not re.fullmatch(_UID, uid or "")
        or len(uid) > 64
        or any(len(part) > 1 and part.startswith("0") for part in uid.split("."))
    ):
        raise DicomwebError(f"{uid!r} is not a valid {what} UID (digits and dots, at most 64 characters)")
    return uid


#: ``user[:password]@`` right after ``scheme://``: everything up to the last ``@`` before the next ``/``
#: that follows it, since a password may hold ``#``, ``?`` or ``/`` and hide from a URL parser.
_USERINFO = re.compile(r"^(?P<scheme>(?:dicomweb\+)?[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^@]*)@")


def _redacted(url: str) -> str:
    """``url`` without anything that may be credentials (``user:password@`` becomes ``***@``)."""
    return _USERINFO.sub(lambda m: m["scheme"] + "***@", url)


def session_from_env(env: Mapping[str, str] | None = None):
    """A ``requests`` session with the credentials of the environment (module docstring).

    Raises:
        DicomwebError: a user without a password (or the reverse), or both a token and a user.
    """
    import requests

    env = os.environ if env is None else env
    token, user, password = env.get(TOKEN_ENV), env.get(USER_ENV), env.get(PASSWORD_ENV)
    session = requests.Session()
    if token and user:
        raise DicomwebError(f"set either {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not both")
    if token:
        session.headers["Authorization"] = f"Bearer {token.strip()}"
    elif user or password:
        if not (user and password):
            raise DicomwebError(f"basic auth needs both {USER_ENV} and {PASSWORD_ENV}")
        session.auth = (user, password)
    return session


def max_download_bytes(env: Mapping[str, str] | None = None) -> int:
    """The download cap in bytes from :data:`MAX_DOWNLOAD_ENV` (MiB)."""
    env = os.environ if env is None else env
    text = env.get(MAX_DOWNLOAD_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_DOWNLOAD_MB * 2**20
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise DicomwebError(f"{MAX_DOWNLOAD_ENV}={text!r}: expected a positive number of MiB")
    return int(value * 2**20)


class Server:
    """A DICOMweb server (``dicomweb-client``), every failure turned into a :class:`DicomwebError`.

    Args:
        base: the DICOMweb root (:func:`base_url` forms).
        session: a ``requests`` session (default :func:`session_from_env`).
    """

    def __init__(self, base: str, session=None):
        from dicomweb_client.api import DICOMwebClient

        self.base_url = base_url(base)
        self.client = DICOMwebClient(
            self.base_url, session=session if session is not None else session_from_env(), timeout=TIMEOUT
        )
        # Busy answers (429 / 503 / 504) and failed connections are retried by the client: 3 attempts,
        # exponential back-off from 0.5 s.
        self.client.set_http_retry_params(
            max_attempts=3,
            wait_exponential_multiplier=500,
            retriable_error_codes=(
                HTTPStatus.TOO_MANY_REQUESTS,
                HTTPStatus.SERVICE_UNAVAILABLE,
                HTTPStatus.GATEWAY_TIMEOUT,
            ),
        )

    def _call(self, what: str, call: Callable[[], T]) -> T:
        import requests
        from retrying import RetryError

        try:
            return call()
        except RetryError as exc:  # still busy after the retries: the last answer
            raise DicomwebError(self._http_message(what, exc.last_attempt.value) + " (3 attempts)") from None
        except requests.HTTPError as exc:
            raise DicomwebError(self._http_message(what, exc.response)) from None
        except requests.exceptions.ChunkedEncodingError as exc:
            raise DicomwebError(
                f"{self.base_url}: {what}: the connection broke in the middle of the answer ({_short(exc)})"
            ) from None
        except requests.Timeout:
            raise DicomwebError(
                f"{self.base_url}: {what}: no answer within {TIMEOUT[1]:.0f} s (3 attempts)"
            ) from None
        except requests.ConnectionError as exc:
            raise DicomwebError(
                f"{self.base_url}: {what}: the server cannot be reached ({_short(exc)})"
            ) from None
        except requests.RequestException as exc:
            raise DicomwebError(f"{self.base_url}: {what}: {_short(exc)}") from None

    def _http_message(self, what: str, response) -> str:
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return (
                f"{self.base_url}: {what}: the server refused the credentials (HTTP {status}); set "
                f"{TOKEN_ENV}, or {USER_ENV} and {PASSWORD_ENV}"
            )
        if status == 404:
            return f"{self.base_url}: {what}: not found on the server (HTTP 404)"
        reason = getattr(response, "reason", "") or ""
        return f"{self.base_url}: {what}: the server answered HTTP {status} {reason}".rstrip()

    def series_instances(self, ref: SeriesRef) -> list[str]:
        """The SOP Instance UIDs of ``ref`` (QIDO-RS), in the server's order.

        Raises:
            DicomwebError: the series is unknown to the server (or any request failure).
        """

        def search() -> list[dict]:
            return self.client.search_for_instances(ref.study_uid, ref.series_uid, get_remaining=True)

        try:
            found = self._call(f"listing series {ref.series_uid}", search)
        except DicomwebError as exc:
            if "HTTP 404" in str(exc):
                raise DicomwebError(f"{ref}: the series is not on the server (HTTP 404)") from None
            raise
        uids = [str(_tag_value(item, "00080018") or "") for item in found]
        if not uids:
            raise DicomwebError(f"{ref}: the series is not on the server (no instance listed)")
        if not all(uids):
            raise DicomwebError(f"{ref}: the server listed instances without a SOP Instance UID")
        return uids

    def download_series(
        self, ref: SeriesRef, folder: str | Path, *, max_bytes: int | None = None
    ) -> list[Path]:
        """Retrieve every instance of ``ref`` (WADO-RS, as stored) into ``folder``; returns the files.

        Files are named ``<index>.dcm`` in arrival order. The download stops with an error when the
        instances written exceed ``max_bytes`` (default :func:`max_download_bytes`), when an instance
        belongs to another series or was not listed, when the stream breaks, or when a listed instance did
        not arrive. The caller owns ``folder`` (a temporary folder) and removes it on error.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cap = max_download_bytes() if max_bytes is None else max_bytes
        expected = self.series_instances(ref)
        wanted = set(expected)
        got: set[str] = set()
        files: list[Path] = []
        total = 0

        def stream() -> Iterable[Any]:
            return self.client.iter_series(
                ref.study_uid, ref.series_uid, media_types=(("application/dicom", "*"),)
            )

        what = f"downloading series {ref.series_uid}"
        iterator = iter(self._call(what, stream))
        while True:
            try:
                ds = self._call(what, lambda: next(iterator, None))
            except DicomwebError as exc:
                raise DicomwebError(f"{exc} (after {len(got)} of {len(expected)} instances)") from None
            except Exception as exc:  # a malformed multipart part or DICOM stream: a cut download
                raise DicomwebError(
                    f"{ref}: the download broke after {len(got)} of {len(expected)} instances ({_short(exc)})"
                ) from None
            if ds is None:
                break
            sop = str(ds.get("SOPInstanceUID", "") or "")
            if str(ds.get("SeriesInstanceUID", "")) != ref.series_uid or sop not in wanted:
                raise DicomwebError(
                    f"{ref}: the server sent instance {sop or '?'}, which the series does not list"
                )
            if sop in got:
                continue
            path = folder / f"{len(files):05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            total += path.stat().st_size
            got.add(sop)
            files.append(path)
            if total > cap:
                raise DicomwebError(
                    f"{ref}: the series is larger than the download cap of {cap / 2**20:.0f} MiB "
                    f"({len(got)} of {len(expected)} instances so far); raise {MAX_DOWNLOAD_ENV}"
                )
        missing = wanted - got
        if missing:
            raise DicomwebError(
                f"{ref}: incomplete download, {len(got)} of {len(expected)} instances arrived "
                f"(missing e.g. {sorted(missing)[0]})"
            )
        log.info("%s: %d instances, %.1f MiB", ref, len(files), total / 2**20)
        return files

    def store(self, paths: Sequence[str | Path]) -> list[str]:
        """Store DICOM files of one study in one STOW-RS request; returns their SOP Instance UIDs.

        Storing a file whose SOP Instance the server holds already is acknowledged and leaves one copy.

        Raises:
            OutputError: files of several studies, or a file the server refused (Failed SOP Sequence) or
                did not acknowledge.
            DicomwebError: the request failed.
        """
        import pydicom

        datasets = [pydicom.dcmread(p) for p in paths]
        studies = {str(ds.StudyInstanceUID) for ds in datasets}
        if len(studies) != 1:
            raise OutputError(
                f"{self.base_url}: one store request takes files of one study ({len(studies)} given)"
            )
        study = studies.pop()
        names = ", ".join(Path(p).name for p in paths)

        def send() -> Any:
            return self.client.store_instances(datasets, study_instance_uid=study)

        answer = self._call(f"storing {names}", send)
        acknowledged = {
            str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])
        }
        refused = [
            f"{Path(p).name} (SOP Instance {ds.SOPInstanceUID})"
            for p, ds in zip(paths, datasets, strict=True)
            if str(ds.SOPInstanceUID) not in acknowledged
        ]
        if refused or answer.get("FailedSOPSequence"):
            reason = _failure_reason(answer)
            raise OutputError(
                f"{self.base_url}: the server did not store {', '.join(refused) or names}"
                + (f": {reason}" if reason else "")
            )
        return [str(ds.SOPInstanceUID) for ds in datasets]


def _failure_reason(answer) -> str:
    reasons = [
        f"failure reason {item.get('FailureReason')}"
        for item in answer.get("FailedSOPSequence", [])
        if item.get("FailureReason") is not None
    ]
    return ", ".join(reasons)


def _tag_value(item: Mapping[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    match = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text)
    if match:
        return f"{match[1]} bytes read, {match[2]} more expected"
    # urllib3's messages carry the whole pool repr; keep the reason at the end
    match = re.search(r"\[Errno -?\d+\][^')\"]*", text)
    if match:
        return match.group(0).strip()
    return text if len(text) <= 300 else text[:297] + "..."
