"""Settings of ``medsam3 serve``: network, model, limits, queue and expiry, checked once at start-up.

Every limit the server enforces lives here, so the command line, the tests and the documentation agree:

* uploads: ``max_upload_mb`` (413 above it), ``max_voxels`` (images whose header declares more voxels are
  refused before their pixels are read: a small compressed file may declare a huge volume);
* DICOM zip archives: ``max_zip_entries``, ``max_unzipped_mb`` (total uncompressed size, counted on the
  bytes actually extracted) and ``max_zip_ratio`` (uncompressed / compressed size, per entry and overall);
* work: ``workers`` jobs run at once, at most ``queue_size`` more wait (a full queue answers 503 with
  ``Retry-After``); results and uploaded images expire ``result_ttl`` seconds after their last use;
* the vision-feature cache: at most ``cache_items`` images and ``cache_mb`` megabytes of features.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from medsam3.errors import MedSam3Error
from medsam3.predict.options import default_of

#: Environment variable holding the access token when ``--token`` is not given.
TOKEN_ENV = "MEDSAM3_TOKEN"

#: Shortest accepted token (characters); shorter ones are too easy to guess.
MIN_TOKEN_LENGTH = 8

_MB = 1024 * 1024


class SettingsError(MedSam3Error):
    """A server setting is out of range (the message names it)."""


@dataclass
class ServeSettings:
    """Everything ``medsam3 serve`` can be told (see the module docstring for the limits).

    Attributes:
        host, port: where to listen; loopback (``127.0.0.1``) unless told otherwise.
        model: model folder or id for :func:`medsam3.model.loading.load_sam3` (``None``: ``$MEDSAM3_MODEL``,
            the configured model, else the bundled one).
        device, dtype: passed to ``load_sam3``.
        token: access token; ``None`` serves without authentication (loopback only is advised).
        work_dir: folder for uploads and results (``None``: a fresh temporary folder removed at exit).
        threshold, presence_threshold: default decision thresholds of a segmentation (a request may
            override them).
        max_storage_mb: disk budget of the work folder (images and results); the oldest idle images
            expire first when an upload needs room, then uploads get 507.
        allowed_hosts: ``Host`` names the server answers besides ``localhost``, ``127.0.0.1``, ``::1`` and
            ``host`` (:meth:`host_allowed`).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    token: str | None = None
    work_dir: Path | None = None
    max_upload_mb: float = 512.0
    max_voxels: int = 2**27
    max_zip_entries: int = 4096
    max_unzipped_mb: float = 2048.0
    max_zip_ratio: float = 100.0
    max_json_kb: float = 256.0
    workers: int = 1
    queue_size: int = 16
    result_ttl: float = 3600.0
    cleanup_interval: float | None = None
    cache_items: int = 8
    cache_mb: float = 2048.0
    image_memory_mb: float = 1024.0
    threshold: float = field(default_factory=lambda: default_of("threshold"))
    presence_threshold: float = field(default_factory=lambda: default_of("presence_threshold"))
    log_level: str = "info"
    allowed_hosts: tuple[str, ...] = ()
    max_storage_mb: float = 20480.0

    def __post_init__(self) -> None:
        if self.token is not None:
            self.token = str(self.token).strip() or None
        if self.work_dir is not None:
            self.work_dir = Path(self.work_dir)
        self.validate()

    # -- derived -------------------------------------------------------------------------------------
    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * _MB)

    @property
    def max_unzipped_bytes(self) -> int:
        return int(self.max_unzipped_mb * _MB)

    @property
    def max_storage_bytes(self) -> int:
        """The disk budget of the work folder: uploads, their copies and the results."""
        return int(self.max_storage_mb * 1024 * 1024)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_kb * 1024)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * _MB)

    @property
    def image_memory_bytes(self) -> int:
        return int(self.image_memory_mb * _MB)

    @property
    def cleanup_period(self) -> float:
        """Seconds between two runs of the expiry task (a quarter of the TTL, between 0.2 s and 60 s)."""
        if self.cleanup_interval is not None:
            return float(self.cleanup_interval)
        return min(60.0, max(0.2, self.result_ttl / 4.0))

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` names this server. A web page the user visits can resolve its own
        domain to 127.0.0.1 (DNS rebinding) and would then reach the API; its requests carry that domain as
        ``Host`` and are refused. Allowed: ``localhost``, loopback addresses, the address served on and
        :attr:`allowed_hosts`; any name when serving on every interface (``0.0.0.0`` / ``::``) with no
        ``allowed_hosts`` (then a token is what protects the server)."""
        name = _host_name(host_header or "")
        if not name:
            return False
        wildcard = self.host in ("0.0.0.0", "::", "")
        if wildcard and not self.allowed_hosts:
            return True
        known = {"localhost", "127.0.0.1", "::1", self.host.lower(), *(h.lower() for h in self.allowed_hosts)}
        return name in known or (name.endswith(".localhost"))

    # -- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`SettingsError` naming the first setting that is out of range."""
        positive = {
            "max-upload-mb": self.max_upload_mb,
            "max-voxels": self.max_voxels,
            "max-zip-entries": self.max_zip_entries,
            "max-unzipped-mb": self.max_unzipped_mb,
            "max-zip-ratio": self.max_zip_ratio,
            "max-json-kb": self.max_json_kb,
            "workers": self.workers,
            "queue-size": self.queue_size,
            "result-ttl": self.result_ttl,
            "cache-items": self.cache_items,
            "cache-mb": self.cache_mb,
            "image-memory-mb": self.image_memory_mb,
            "max-storage-mb": self.max_storage_mb,
        }
        for name, value in positive.items():
            if not value > 0:
                raise SettingsError(f"--{name} must be positive, got {value}")
        if not 0 < int(self.port) < 65536 and int(self.port) != 0:
            raise SettingsError(f"--port must be between 1 and 65535, got {self.port}")
        for name, value in (("threshold", self.threshold), ("presence threshold", self.presence_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise SettingsError(f"{name} must be between 0 and 1, got {value}")
        if self.token is not None:
            if len(self.token) < MIN_TOKEN_LENGTH:
                raise SettingsError(f"the token must have at least {MIN_TOKEN_LENGTH} characters")
            if not re.fullmatch(r"[\x21-\x7e]+", self.token):
                raise SettingsError("the token must be printable ASCII without spaces")


def _host_name(header: str) -> str:
    """The host of a ``Host`` / origin authority without its port: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_from_env(value: str | None) -> str | None:
    """The token given on the command line, else ``$MEDSAM3_TOKEN``, else ``None``."""
    if value:
        return value
    env = os.environ.get(TOKEN_ENV, "").strip()
    return env or None
