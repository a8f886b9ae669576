"""A real Orthanc server for the PACS tests, a loopback proxy that can hold or cut its answers, and a
hospital-like copy of the sample DICOM series.

* :func:`start_orthanc` runs Debian's ``Orthanc`` with its DICOMweb plugin on a free loopback port, with a
  temporary storage folder and configuration (basic auth, no DICOM port, ``StableAge`` 1 s); the caller
  stops it (:meth:`OrthancServer.stop`). Missing binaries skip the tests, or fail them when
  ``MEDSAM3_REQUIRE_SERVICES=1`` (CI, where ``scripts/install_services.sh`` installs Orthanc).
* :class:`Proxy` forwards HTTP to Orthanc; a rule can cut a response after some bytes (a download broken in
  the middle) or hold a response after the server answered (so a test can kill the client right after a
  STOW-RS request reached the server).
* :func:`hospital_series` copies the TotalSegmentator sample series (anonymised: no Study / Series / SOP
  Instance UIDs) with new UIDs and patient identifiers, as a PACS would hold it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "medsam3", "pacs-test-secret"


def require_orthanc() -> None:
    """Skip without Orthanc and its DICOMweb plugin, or fail with ``MEDSAM3_REQUIRE_SERVICES=1``."""
    missing = [str(p) for p in (ORTHANC, DICOMWEB_PLUGIN) if not p.exists()]
    if not missing:
        return
    message = f"Orthanc is not installed ({', '.join(missing)} missing): run scripts/install_services.sh"
    if os.environ.get("MEDSAM3_REQUIRE_SERVICES", "").strip() not in ("", "0"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    """A running Orthanc: its URL, credentials, process and folder."""

    port: int
    folder: Path
    process: subprocess.Popen
    url: str = ""

    def __post_init__(self):
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return self.url + "/dicom-web"

    def rest(self, method: str, path: str, body: bytes | None = None, auth: bool = True):
        """One REST call; returns ``(status, parsed JSON or raw bytes)``."""
        import requests

        response = requests.request(
            method, self.url + path, data=body, auth=(USER, PASSWORD) if auth else None, timeout=60
        )
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, response.content

    def upload(self, files: list[Path]) -> None:
        """Store files through the REST API (``POST /instances``)."""
        for path in files:
            status, answer = self.rest("POST", "/instances", path.read_bytes())
            assert status == 200, (path, status, answer)

    def series(self) -> list[dict]:
        """Every series with its main tags and instances (``/series?expand``)."""
        return self.rest("GET", "/series?expand")[1]

    def series_of_study(self, study_uid: str) -> list[dict]:
        return [s for s in self.series() if self.study_uid(s["ParentStudy"]) == study_uid]

    def study_uid(self, orthanc_id: str) -> str:
        return self.rest("GET", f"/studies/{orthanc_id}")[1]["MainDicomTags"]["StudyInstanceUID"]

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.rest("GET", f"/instances/{orthanc_id}/file")[1]

    def wait_stable(self, timeout: float = 30.0) -> None:
        """Wait until every series is stable (Orthanc's ``StableAge``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(s.get("IsStable") for s in self.series()):
                return
            time.sleep(0.2)
        raise TimeoutError("Orthanc's series did not become stable")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_orthanc(folder: Path) -> OrthancServer:
    """Start Orthanc in ``folder`` on a free loopback port; waits (bounded) until it answers."""
    require_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # another process may take the free port before Orthanc binds it
        port = free_port()
        config = {
            "Name": "medsam3-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "StableAge": 1,
            "SaveJobs": False,
            "HttpTimeout": 60,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        log = open(folder / "orthanc.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=log)
        server = OrthancServer(port, folder, process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if server.rest("GET", "/system")[0] == 200:
                    return server
            except OSError:
                pass
            except Exception:  # requests' ConnectionError while starting
                pass
            time.sleep(0.2)
        server.stop()
    raise RuntimeError(f"Orthanc did not start; see {folder / 'orthanc.log'}")


def hospital_series(
    source: Path, dest: Path, *, description: str = "CT abdomen", n: int | None = None
) -> Path:
    """Copy the DICOM files of ``source`` into ``dest`` with new Study / Series UIDs, SOP UIDs from the
    file meta, and patient and study identifiers, as an unanonymised export would have them."""
    import pydicom
    from pydicom.uid import generate_uid

    dest.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for i, path in enumerate(sorted(p for p in source.iterdir() if p.is_file())[:n]):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.PatientID, ds.PatientName = "MEDSAM3-TEST-1", "Test^Patient"
        ds.StudyID, ds.AccessionNumber, ds.SeriesNumber = "1", "ACC1", 2
        ds.SeriesDescription = description
        ds.save_as(dest / f"{i:04d}.dcm", enforce_file_format=True)
    return dest


@dataclass
class Rule:
    """What the proxy does with requests whose method and path match: ``cut_after`` bytes of the
    response body then close, or ``hold`` the response (after the server answered) until released."""

    method: str
    path_contains: str
    cut_after: int | None = None
    hold: bool = False
    seen: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Proxy:
    """An HTTP proxy on a free loopback port in front of ``target`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, target: str):
        self.target = target.split("://", 1)[1]
        self.rules: list[Rule] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "connection", "transfer-encoding", "content-length")
                }
                upstream = http.client.HTTPConnection(proxy.target, timeout=120)
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                rule = proxy.match(self.command, self.path)
                if rule is not None:
                    rule.seen.set()
                    if rule.hold:
                        rule.release.wait(timeout=300)
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                if rule is not None and rule.cut_after is not None:
                    self.wfile.write(data[: rule.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(data)
                self.close_connection = True

            def _read_chunked(self) -> bytes:
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def match(self, method: str, path: str) -> Rule | None:
        for rule in self.rules:
            if rule.method == method and rule.path_contains in path:
                return rule
        return None

    def stop(self) -> None:
        for rule in self.rules:
            rule.release.set()
        self.server.shutdown()
        self.server.server_close()
