"""PACS pieces without a PACS: DICOMweb URLs and UIDs, credentials and the download cap from an env mapping,
``Server`` error translation against a closed port and a tiny local HTTP server, the remote input / store
option rules, ``input_value``, the watcher's SQLite state, ``Selection`` rules, the ``Watcher`` loop with a
fake Orthanc and a fake handler, and ``status_table``. Hand-computed values and fakes only (the real
Orthanc server is exercised elsewhere)."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from medsam3.commands.inference_options import input_value
from medsam3.errors import MedSam3Error, OptionError, OutputError
from medsam3.pacs.dicomweb import (
    DEFAULT_MAX_DOWNLOAD_MB,
    MAX_DOWNLOAD_ENV,
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    DicomwebError,
    SeriesRef,
    Server,
    base_url,
    check_uid,
    is_dicomweb_url,
    max_download_bytes,
    parse_series_url,
    session_from_env,
)
from medsam3.pacs.remote import check_storable, results_to_store, series_ref, store_target
from medsam3.pacs.watch import Orthanc, Selection, Watcher, WatchState, status_table

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
DCM4CHEE = "http://pacs.example.org:8080/dcm4chee-arc/aets/DCM4CHEE/rs"


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch):
    for name in (TOKEN_ENV, USER_ENV, PASSWORD_ENV, MAX_DOWNLOAD_ENV):
        monkeypatch.delenv(name, raising=False)


# --- URLs and UIDs ------------------------------------------------------------------------------------------


def test_parse_series_url_with_port_and_multi_segment_root():
    ref = parse_series_url(f"dicomweb+{DCM4CHEE}/studies/{STUDY}/series/{SERIES}")
    assert ref == SeriesRef(DCM4CHEE, STUDY, SERIES)


def test_parse_series_url_https_trailing_slash_and_case_of_scheme():
    ref = parse_series_url(f"DICOMWEB+HTTPS://Pacs.Example.org/dicom-web/studies/{STUDY}/series/{SERIES}/")
    assert ref == SeriesRef("https://pacs.example.org/dicom-web", STUDY, SERIES)


def test_parse_series_url_ipv6_host_keeps_brackets():
    ref = parse_series_url(f"dicomweb+http://[::1]:8042/dicom-web/studies/{STUDY}/series/{SERIES}")
    assert ref.base_url == "http://[::1]:8042/dicom-web"
    assert parse_series_url(ref.url) == ref


@pytest.mark.parametrize(
    "root", [DCM4CHEE, "https://pacs/dicom-web", "http://[::1]:8042/dicom-web", "http://orthanc:8042"]
)
def test_series_ref_url_round_trips(root):
    ref = SeriesRef(root, STUDY, SERIES)
    assert ref.url == f"dicomweb+{root}/studies/{STUDY}/series/{SERIES}"
    assert str(ref) == ref.url
    assert parse_series_url(ref.url) == ref


def test_base_url_strips_prefix_and_trailing_slash():
    assert base_url("dicomweb+http://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web"
    assert base_url("HTTP://PACS/dicom-web") == "http://pacs/dicom-web"


@pytest.mark.parametrize(
    "url",
    [
        f"dicomweb+https://alice:s3cret@pacs/dicom-web/studies/{STUDY}/series/{SERIES}",
        f"dicomweb+http://alice:s3cret@pacs:8042/dicom-web/studies/{STUDY}/series/{SERIES}",
    ],
)
def test_credentials_in_url_are_refused_without_showing_the_password(url):
    with pytest.raises(DicomwebError, match="credentials in the URL are refused") as info:
        parse_series_url(url)
    assert "s3cret" not in str(info.value)
    assert TOKEN_ENV in str(info.value)


def test_user_only_in_url_is_refused():
    with pytest.raises(DicomwebError, match="credentials"):
        base_url("http://alice@pacs/dicom-web")


def test_credentials_with_a_bad_port_are_a_dicomweb_error_without_the_password():
    # BUG: _redacted() reads parts.port, which raises ValueError for a bad port, so this escapes as a
    # ValueError instead of the documented DicomwebError.
    url = f"dicomweb+https://alice:s3cret@pacs:99999/dicom-web/studies/{STUDY}/series/{SERIES}"
    with pytest.raises(DicomwebError) as info:
        parse_series_url(url)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "dicomweb+http://pacs/dicom-web",
        f"dicomweb+http://pacs/dicom-web/studies/{STUDY}",
        f"dicomweb+http://pacs/dicom-web/series/{SERIES}",
        f"dicomweb+http://pacs/dicom-web/studies/{STUDY}/series/{SERIES}/instances/1.2.3",
        f"dicomweb+http://pacs/dicom-web/studies/{STUDY}/series/1.2.abc",
    ],
)
def test_url_without_studies_and_series_is_refused(url):
    with pytest.raises(DicomwebError, match="STUDY_UID/series/SERIES_UID"):
        parse_series_url(url)


@pytest.mark.parametrize(
    ("study", "series", "what"),
    [("1.02", SERIES, "study"), (STUDY, "1." + "2" * 63, "series"), (STUDY, "01.2", "series")],
)
def test_malformed_uid_in_url_is_named(study, series, what):
    with pytest.raises(DicomwebError, match=f"not a valid {what} UID"):
        parse_series_url(f"dicomweb+http://pacs/dicom-web/studies/{study}/series/{series}")


@pytest.mark.parametrize("uid", ["1.2.abc", "1.2.", ".1.2", "1..2", "", "1.02", "1." + "2" * 63, " 1.2"])
def test_check_uid_refuses(uid):
    with pytest.raises(DicomwebError, match="not a valid study UID"):
        check_uid(uid, "study")


@pytest.mark.parametrize("uid", ["0", "1.0.2", "1." + "2" * 62, STUDY])
def test_check_uid_accepts(uid):
    assert check_uid(uid, "series") == uid


@pytest.mark.parametrize(
    "url",
    [
        f"dicomweb+ftp://pacs/dicom-web/studies/{STUDY}/series/{SERIES}",
        f"http://pacs/dicom-web/studies/{STUDY}/series/{SERIES}",
        f"/data/studies/{STUDY}/series/{SERIES}",
    ],
)
def test_non_http_scheme_is_refused(url):
    with pytest.raises(DicomwebError, match="not a dicomweb"):
        parse_series_url(url)


def test_base_url_refuses_other_schemes_and_query():
    with pytest.raises(DicomwebError, match="not a DICOMweb URL"):
        base_url("ftp://pacs/dicom-web")
    with pytest.raises(DicomwebError, match="not a DICOMweb URL"):
        base_url("pacs/dicom-web")
    with pytest.raises(DicomwebError, match="no query or fragment"):
        base_url("http://pacs/dicom-web?x=1")


@pytest.mark.parametrize("port", ["99999", "abc", "-1"])
def test_bad_port_is_refused(port):
    with pytest.raises(DicomwebError, match="port is not a number"):
        parse_series_url(f"dicomweb+http://pacs:{port}/dicom-web/studies/{STUDY}/series/{SERIES}")


def test_is_dicomweb_url():
    assert is_dicomweb_url("dicomweb+http://pacs/x")
    assert is_dicomweb_url("DICOMWEB+HTTPS://pacs/x")
    assert not is_dicomweb_url("http://pacs/x")
    assert not is_dicomweb_url("dicomweb+ftp://pacs/x")
    assert not is_dicomweb_url(Path("dicomweb+http://pacs/x"))  # a Path folds the // away


def test_input_value_keeps_dicomweb_url_as_string():
    url = f"dicomweb+http://pacs:8042/dicom-web/studies/{STUDY}/series/{SERIES}"
    value = input_value(url)
    assert isinstance(value, str)
    assert value == url and "//pacs" in value
    assert isinstance(input_value("DICOMWEB+HTTPS://pacs/x"), str)


def test_input_value_path_becomes_path():
    assert input_value("scans/ct.nii.gz") == Path("scans/ct.nii.gz")
    assert isinstance(input_value("scans//ct"), Path)


# --- credentials and download cap ---------------------------------------------------------------------------


def test_session_bearer_token():
    session = session_from_env({TOKEN_ENV: " tok-123 \n"})
    assert session.headers["Authorization"] == "Bearer tok-123"
    assert session.auth is None


def test_session_basic_auth():
    session = session_from_env({USER_ENV: "alice", PASSWORD_ENV: "s3cret"})
    assert session.auth == ("alice", "s3cret")
    assert "Authorization" not in session.headers


@pytest.mark.parametrize(
    "env", [{USER_ENV: "alice"}, {PASSWORD_ENV: "s3cret"}, {USER_ENV: "alice", PASSWORD_ENV: ""}]
)
def test_session_basic_auth_needs_both(env):
    with pytest.raises(DicomwebError, match=f"needs both {USER_ENV} and {PASSWORD_ENV}"):
        session_from_env(env)


def test_session_token_and_user_both_refused():
    with pytest.raises(DicomwebError, match="not both"):
        session_from_env({TOKEN_ENV: "tok", USER_ENV: "alice", PASSWORD_ENV: "s3cret"})


def test_session_without_credentials():
    session = session_from_env({})
    assert session.auth is None
    assert "Authorization" not in session.headers


def test_max_download_bytes_default_and_mib():
    assert max_download_bytes({}) == DEFAULT_MAX_DOWNLOAD_MB * 2**20 == 4096 * 1048576
    assert max_download_bytes({MAX_DOWNLOAD_ENV: "  "}) == 4096 * 1048576
    assert max_download_bytes({MAX_DOWNLOAD_ENV: "10"}) == 10_485_760
    assert max_download_bytes({MAX_DOWNLOAD_ENV: "0.5"}) == 524_288


@pytest.mark.parametrize("text", ["0", "-1", "abc", "inf", "nan", "1e400"])
def test_max_download_bytes_invalid(text):
    with pytest.raises(DicomwebError, match=MAX_DOWNLOAD_ENV):
        max_download_bytes({MAX_DOWNLOAD_ENV: text})


# --- Server error translation (closed port, tiny local HTTP server) -----------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        status, body = self.server.route(self.path)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.seen = []
    server.route = lambda path: (404, b"")
    server.root = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_retry_wait(monkeypatch):
    """dicomweb-client's retries (``retrying``) without their back-off sleeps."""
    import retrying

    monkeypatch.setattr(retrying, "time", SimpleNamespace(time=time.time, sleep=lambda seconds: None))


def _instance(uid: str) -> dict:
    return {"00080018": {"vr": "UI", "Value": [uid]}}


def _listing(uids):
    def route(path):
        offset = int(parse_qs(urlsplit(path).query).get("offset", ["0"])[0])
        return 200, [_instance(u) for u in uids] if offset == 0 else []

    return route


def _ref(server) -> SeriesRef:
    return SeriesRef(server.root + "/dicom-web", STUDY, SERIES)


def test_server_unreachable(no_retry_wait):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = f"http://127.0.0.1:{port}/dicom-web"
    with pytest.raises(DicomwebError, match="cannot be reached") as info:
        Server(root).series_instances(SeriesRef(root, STUDY, SERIES))
    assert root in str(info.value)


def test_server_lists_instances_with_bearer_token(http_server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "tok-123")
    http_server.route = _listing(["1.2.3.1", "1.2.3.2"])
    assert Server(http_server.root + "/dicom-web").series_instances(_ref(http_server)) == [
        "1.2.3.1",
        "1.2.3.2",
    ]
    path, auth = http_server.seen[0]
    assert urlsplit(path).path == f"/dicom-web/studies/{STUDY}/series/{SERIES}/instances"
    assert auth == "Bearer tok-123"
    assert {a for _, a in http_server.seen} == {"Bearer tok-123"}


def test_server_sends_basic_auth(http_server, monkeypatch):
    monkeypatch.setenv(USER_ENV, "alice")
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    http_server.route = _listing(["1.2.3.1"])
    Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))
    assert http_server.seen[0][1] == "Basic " + base64.b64encode(b"alice:s3cret").decode()


@pytest.mark.parametrize("status", [401, 403])
def test_server_refused_credentials_names_token_variable(http_server, status):
    http_server.route = lambda path: (status, b"")
    with pytest.raises(DicomwebError, match=f"refused the credentials \\(HTTP {status}\\)") as info:
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))
    assert TOKEN_ENV in str(info.value)
    assert len(http_server.seen) == 1


def test_server_404_is_series_not_on_server(http_server):
    http_server.route = lambda path: (404, b"")
    with pytest.raises(DicomwebError, match="the series is not on the server \\(HTTP 404\\)") as info:
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))
    assert SERIES in str(info.value)


def test_server_500_names_status_and_reason(http_server):
    http_server.route = lambda path: (500, b"boom")
    with pytest.raises(DicomwebError, match="answered HTTP 500 Internal Server Error"):
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))
    assert len(http_server.seen) == 1


def test_server_empty_listing_is_series_not_on_server(http_server):
    http_server.route = lambda path: (200, [])
    with pytest.raises(DicomwebError, match="not on the server \\(no instance listed\\)"):
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))


def test_server_listing_without_sop_uid_is_refused(http_server):
    http_server.route = _listing(["1.2.3.1", ""])
    with pytest.raises(DicomwebError, match="without a SOP Instance UID"):
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))


def test_server_persistent_503_is_a_dicomweb_error(http_server, no_retry_wait):
    # BUG: after the client's retries of 429/503/504, dicomweb-client (retrying) raises retrying.RetryError,
    # which Server._call does not translate: it escapes as a raw RetryError.
    http_server.route = lambda path: (503, b"")
    with pytest.raises(DicomwebError, match="HTTP 503"):
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))
    assert len(http_server.seen) == 3  # retried: max_attempts=3


def test_server_does_not_retry_408(http_server, no_retry_wait):
    # BUG: Server.__init__ says "429 / 503 / 504 are retried ...; not 408", but set_http_retry_params keeps
    # dicomweb-client's default retriable codes, which include 408 (3 requests, then a raw RetryError).
    http_server.route = lambda path: (408, b"")
    with pytest.raises(DicomwebError, match="HTTP 408"):
        Server(http_server.root + "/dicom-web").series_instances(_ref(http_server))
    assert len(http_server.seen) == 1


def test_orthanc_rest_errors_and_changes(http_server):
    routes = {
        "/changes": (200, {"Changes": [{"Seq": 4, "ChangeType": "StableSeries", "ID": "s1"}], "Last": 4}),
        "/secret": (401, b""),
        "/text": (200, b"not json"),
    }
    http_server.route = lambda path: routes.get(urlsplit(path).path, (404, b""))
    orthanc = Orthanc(http_server.root + "/")
    assert orthanc.dicomweb == http_server.root + "/dicom-web"
    assert orthanc.changes(3) == ([{"Seq": 4, "ChangeType": "StableSeries", "ID": "s1"}], 4, True)
    assert parse_qs(urlsplit(http_server.seen[0][0]).query) == {"since": ["3"], "limit": ["100"]}
    with pytest.raises(DicomwebError, match="refused the credentials \\(HTTP 401\\)"):
        orthanc.get("/secret")
    with pytest.raises(DicomwebError, match="not found \\(HTTP 404\\)"):
        orthanc.get("/series/gone")
    with pytest.raises(DicomwebError, match="not JSON"):
        orthanc.get("/text")


# --- remote input and store options -------------------------------------------------------------------------


def test_series_ref_from_url_input():
    url = f"dicomweb+{DCM4CHEE}/studies/{STUDY}/series/{SERIES}"
    assert series_ref(url, None, None, None) == SeriesRef(DCM4CHEE, STUDY, SERIES)


def test_series_ref_local_input_is_none():
    assert series_ref(Path("ct.nii.gz"), None, None, None) is None
    assert series_ref("ct.nii.gz", None, None, None) is None
    assert series_ref(None, None, None, None) is None


def test_series_ref_from_dicomweb_study_series():
    ref = series_ref(None, DCM4CHEE + "/", STUDY, SERIES)
    assert ref == SeriesRef(DCM4CHEE, STUDY, SERIES)


@pytest.mark.parametrize(
    ("source", "dicomweb", "study", "series", "match"),
    [
        (None, None, STUDY, None, "--study name a series on a server given with --dicomweb"),
        (None, None, STUDY, SERIES, "--study and --series name a series"),
        (Path("ct.nii.gz"), None, None, SERIES, "--series name a series"),
        (f"dicomweb+{DCM4CHEE}/studies/{STUDY}/series/{SERIES}", DCM4CHEE, STUDY, SERIES, "not both"),
        (Path("ct.nii.gz"), DCM4CHEE, STUDY, SERIES, "not both"),
        (None, DCM4CHEE, STUDY, None, "needs --study UID and --series UID"),
        (None, DCM4CHEE, None, None, "needs --study UID and --series UID"),
    ],
)
def test_series_ref_option_errors(source, dicomweb, study, series, match):
    with pytest.raises(OptionError, match=match):
        series_ref(source, dicomweb, study, series)


def test_series_ref_bad_uid_or_root_with_dicomweb():
    with pytest.raises(DicomwebError, match="not a valid series UID"):
        series_ref(None, DCM4CHEE, STUDY, "1.2.x")
    with pytest.raises(DicomwebError, match="not a DICOMweb URL"):
        series_ref(None, "pacs/dicom-web", STUDY, SERIES)


def test_store_target():
    ref = SeriesRef(DCM4CHEE, STUDY, SERIES)
    assert store_target(None, ref) is None
    assert store_target("source", ref) == DCM4CHEE
    assert store_target("https://other:443/dicom-web/", ref) == "https://other:443/dicom-web"
    assert store_target("dicomweb+http://other/dicom-web", None) == "http://other/dicom-web"
    with pytest.raises(OptionError, match="needs a DICOMweb input"):
        store_target("source", None)
    with pytest.raises(DicomwebError):
        store_target("ftp://other", ref)


def test_check_storable():
    check_storable(None)
    check_storable(["nifti", "dicom-seg"])
    check_storable(["rtstruct"])
    with pytest.raises(OptionError, match="given: nifti, png"):
        check_storable(["nifti", "png"])


def test_results_to_store_order_and_nothing():
    paths = {"nifti": Path("a_seg.nii.gz"), "rtstruct": Path("a_rt.dcm"), "dicom_seg": Path("a_seg.dcm")}
    assert results_to_store(paths) == [Path("a_seg.dcm"), Path("a_rt.dcm")]
    assert results_to_store({"rtstruct": Path("a_rt.dcm")}) == [Path("a_rt.dcm")]
    with pytest.raises(OutputError, match="nothing to store"):
        results_to_store({"nifti": Path("a_seg.nii.gz")})


# --- watch state --------------------------------------------------------------------------------------------


def _series(n: int, description: str = "") -> dict[str, str]:
    return {
        "series_uid": f"1.2.3.{n}",
        "study_uid": "1.2.3",
        "orthanc_id": f"orthanc-{n}",
        "description": description,
    }


@pytest.fixture
def state(tmp_path):
    st = WatchState(tmp_path / "sub" / "state.sqlite")
    yield st
    st.close()


def test_state_record_adds_pending_and_moves_feed(state):
    assert state.last_seq == 0
    assert state.record([_series(1, "chest"), _series(2)], 7) == [
        _series(1)["series_uid"],
        _series(2)["series_uid"],
    ]
    assert state.last_seq == 7
    rows = state.rows()
    assert [(r.series_uid, r.status, r.attempts, r.description) for r in rows] == [
        ("1.2.3.1", "pending", 0, "chest"),
        ("1.2.3.2", "pending", 0, ""),
    ]
    assert state.record([_series(1), _series(1)], 9) == []
    assert state.last_seq == 9
    assert len(state.rows()) == 2


def test_state_record_is_one_transaction(state):
    bad = {**_series(2), "description": {"not": "bindable"}}
    with pytest.raises(sqlite3.Error):
        state.record([_series(1), bad], 5)
    assert state.rows() == []
    assert state.last_seq == 0


def test_state_start_counts_attempts(state):
    state.record([_series(1)], 1)
    assert state.start("1.2.3.1") == 1
    assert state.rows("running")[0].attempts == 1
    assert state.start("1.2.3.1") == 2


def test_state_fail_backs_off_then_parks(state):
    state.record([_series(1)], 1)
    for attempt, delay in ((1, 10.0), (2, 20.0)):
        state.start("1.2.3.1")
        before = time.time()
        status, next_try = state.fail("1.2.3.1", f"error {attempt}", max_attempts=3, retry_delay=10.0)
        assert status == "failed"
        assert before + delay - 1e-3 <= next_try <= time.time() + delay + 1e-3
        row = state.rows()[0]
        assert (row.status, row.next_try, row.last_error) == ("failed", next_try, f"error {attempt}")
    state.start("1.2.3.1")
    assert state.fail("1.2.3.1", "error 3", max_attempts=3, retry_delay=10.0) == ("parked", 0.0)
    row = state.rows()[0]
    assert (row.status, row.attempts, row.last_error) == ("parked", 3, "error 3")
    assert state.next_due(time.time() + 1e6) is None
    assert state.next_retry() is None


def test_state_next_due_skips_waiting_series(state):
    state.record([_series(1), _series(2)], 2)
    state.start("1.2.3.1")
    _, next_try = state.fail("1.2.3.1", "x", max_attempts=3, retry_delay=100.0)
    assert state.next_due(time.time()).series_uid == "1.2.3.2"
    assert state.next_retry() == 0.0
    state.start("1.2.3.2")
    state.finish("1.2.3.2", {"stored": ["1.9"]})
    assert state.next_due(time.time()) is None
    assert state.next_retry() == next_try
    assert state.next_due(next_try).series_uid == "1.2.3.1"
    assert json.loads(state.rows("done")[0].result) == {"stored": ["1.9"]}


def test_state_requeue_running(state):
    state.record([_series(1), _series(2)], 2)
    state.start("1.2.3.1")
    assert state.requeue_running() == ["1.2.3.1"]
    row = state.rows()[0]
    assert (row.status, row.attempts, row.next_try) == ("pending", 1, 0.0)
    assert state.requeue_running() == []


def test_state_persists_across_reopening(tmp_path):
    path = tmp_path / "state.sqlite"
    first = WatchState(path)
    first.record([_series(1), _series(2)], 12)
    first.start("1.2.3.1")
    first.finish("1.2.3.1", {"seg": "x"})
    first.close()
    again = WatchState(path)
    try:
        assert again.last_seq == 12
        assert [(r.series_uid, r.status, r.attempts) for r in again.rows()] == [
            ("1.2.3.1", "done", 1),
            ("1.2.3.2", "pending", 0),
        ]
    finally:
        again.close()


def test_state_file_that_is_not_sqlite(tmp_path):
    path = tmp_path / "state.sqlite"
    path.write_bytes(b"this is not a database\n" * 200)
    with pytest.raises(MedSam3Error, match="not a usable watch state file") as info:
        WatchState(path)
    assert str(path) in str(info.value)


# --- selection ----------------------------------------------------------------------------------------------


def test_selection_parse():
    selection = Selection.parse(["Modality=CT", " SeriesDescription =*a=b*"])
    assert selection.rules == [("Modality", "CT"), ("SeriesDescription", "*a=b*")]
    assert Selection.parse(None).rules == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("Modalty=CT", "'Modalty' is not a DICOM keyword"),
        ("modality=CT", "is not a DICOM keyword"),
        ("Modality", "expected TAG=PATTERN"),
        ("=CT", "expected TAG=PATTERN"),
        ("Modality=", "expected TAG=PATTERN"),
    ],
)
def test_selection_parse_errors(text, match):
    with pytest.raises(OptionError, match=match):
        Selection.parse([text])


def test_selection_accepts_case_insensitive_patterns_all_rules():
    selection = Selection.parse(["Modality=CT", "SeriesDescription=*chest*"])
    assert selection.accepts({"Modality": "ct", "SeriesDescription": "Thorax CHEST w/o"})
    assert not selection.accepts({"Modality": "MR", "SeriesDescription": "chest"})
    assert not selection.accepts({"Modality": "CT", "SeriesDescription": "abdomen"})
    assert not selection.accepts({"Modality": "CT"})
    assert Selection().accepts({})
    assert Selection.parse(["SeriesDescription=[a-c]x?"]).accepts({"SeriesDescription": "BXY"})


def _counting(tags):
    calls = []

    def more():
        calls.append(1)
        return tags

    return more, calls


def test_selection_more_is_lazy_and_called_at_most_once():
    selection = Selection.parse(["Modality=CT", "BodyPartExamined=CHEST", "ProtocolName=*lung*"])
    more, calls = _counting({"BodyPartExamined": "chest", "ProtocolName": "Lung low dose"})
    full = {"Modality": "CT", "BodyPartExamined": "CHEST", "ProtocolName": "lung"}
    assert selection.accepts(full, more) and calls == []
    assert selection.accepts({"Modality": "CT"}, more) and calls == [1]
    more, calls = _counting({})
    assert not selection.accepts({"Modality": "CT"}, more) and calls == [1]
    more, calls = _counting({"BodyPartExamined": "CHEST"})
    assert not selection.accepts({"Modality": "MR"}, more) and calls == []


# --- watcher ------------------------------------------------------------------------------------------------

DICOMWEB = "http://orthanc:8042/dicom-web"


class FakeOrthanc:
    """Orthanc's change feed and series tags from lists; ``page`` changes per feed page."""

    dicomweb = DICOMWEB

    def __init__(self, feed, series, shared=None, page=100):
        self.feed, self.series, self.shared, self.page = feed, series, shared or {}, page
        self.since_calls: list[int] = []

    def changes(self, since, limit=100):
        self.since_calls.append(since)
        after = [c for c in self.feed if c["Seq"] > since][: min(limit, self.page)]
        last = after[-1]["Seq"] if after else since
        return after, last, not after or after[-1] is self.feed[-1]

    def series_info(self, orthanc_id):
        return dict(self.series[orthanc_id])

    def shared_tags(self, orthanc_id):
        return dict(self.shared.get(orthanc_id, {}))


def _tags(n: int, modality: str = "CT", description: str = "") -> dict[str, str]:
    return {
        "SeriesInstanceUID": f"1.2.3.{n}",
        "StudyInstanceUID": "1.2.3",
        "Modality": modality,
        "SeriesDescription": description,
    }


def _feed(*entries):
    return [{"Seq": seq, "ChangeType": kind, "ID": oid} for seq, (kind, oid) in enumerate(entries, 1)]


class Handler:
    """Records the series handed over; fails the first ``failures`` calls for each series."""

    def __init__(self, failures: int = 0, error: BaseException | None = None):
        self.failures, self.error, self.refs = failures, error, []

    def __call__(self, ref):
        self.refs.append(ref)
        if sum(r == ref for r in self.refs) <= self.failures:
            raise self.error or RuntimeError(f"no luck with {ref.series_uid}")
        return {"stored": [ref.series_uid + ".99"]}


class Sleeps(list):
    """A bounded stand-in for ``time.sleep``: records the waits, sleeps a little, stops a runaway loop."""

    def __call__(self, seconds):
        self.append(seconds)
        if len(self) > 2000:
            raise RuntimeError("watcher loop does not end")
        time.sleep(min(seconds, 0.01))


def _watcher(orthanc, state, handle, selection=None, **kw):
    lines: list[str] = []
    watcher = Watcher(
        orthanc,
        state,
        selection or Selection.parse(["Modality=CT"]),
        handle,
        retry_delay=kw.pop("retry_delay", 0.001),
        poll=0.01,
        echo=lines.append,
        sleep=kw.pop("sleep", Sleeps()),
        **kw,
    )
    return watcher, lines


def test_watcher_handles_selected_stable_series_once_in_feed_order(state):
    series = {
        "a": _tags(1, description="chest"),
        "b": _tags(2, "MR"),
        "c": _tags(3, "SEG"),
        "d": _tags(4, "RTSTRUCT"),
        "e": _tags(5),
        "f": _tags(6),
    }
    feed = _feed(
        ("NewSeries", "a"),
        ("StableSeries", "e"),
        ("StableSeries", "b"),
        ("StableSeries", "c"),
        ("NewInstance", "f"),
        ("StableSeries", "a"),
        ("StableStudy", "f"),
        ("StableSeries", "d"),
        ("StableSeries", "e"),
    )
    handle = Handler()
    watcher, lines = _watcher(FakeOrthanc(feed, series), state, handle, Selection.parse(["Modality=C*"]))
    assert watcher.run(once=True) == 0
    assert [r.series_uid for r in handle.refs] == ["1.2.3.5", "1.2.3.1"]
    assert handle.refs[0] == SeriesRef(DICOMWEB, "1.2.3", "1.2.3.5")
    assert [(r.series_uid, r.status, r.attempts) for r in state.rows()] == [
        ("1.2.3.5", "done", 1),
        ("1.2.3.1", "done", 1),
    ]
    assert json.loads(state.rows()[0].result) == {"stored": ["1.2.3.5.99"]}
    assert state.last_seq == 9
    assert "queued 1.2.3.1 (chest)" in lines and "done 1.2.3.1" in lines
    assert watcher.run(once=True) == 0
    assert len(handle.refs) == 2


def test_watcher_selection_uses_shared_tags(state):
    series = {"a": _tags(1), "b": _tags(2)}
    shared = {"a": {"BodyPartExamined": "CHEST"}, "b": {"BodyPartExamined": "HEAD"}}
    orthanc = FakeOrthanc(_feed(("StableSeries", "a"), ("StableSeries", "b")), series, shared)
    handle = Handler()
    watcher, _ = _watcher(orthanc, state, handle, Selection.parse(["BodyPartExamined=chest"]))
    watcher.run(once=True)
    assert [r.series_uid for r in handle.refs] == ["1.2.3.1"]


def test_watcher_retries_then_succeeds(state):
    handle = Handler(failures=2)
    sleeps = Sleeps()
    orthanc = FakeOrthanc(_feed(("StableSeries", "a")), {"a": _tags(1)})
    watcher, lines = _watcher(orthanc, state, handle, sleep=sleeps)
    assert watcher.run(once=True) == 0
    row = state.rows()[0]
    assert (row.status, row.attempts, row.last_error) == ("done", 3, "")
    assert len(handle.refs) == 3
    assert all(0 <= s <= 0.01 for s in sleeps)
    assert sum(line.startswith("failed 1.2.3.1") for line in lines) == 2
    assert "segmenting 1.2.3.1 (attempt 3/3)" in lines


def test_watcher_parks_series_that_always_fail(state):
    handle = Handler(failures=10**6, error=DicomwebError("pacs: the server cannot be reached"))
    orthanc = FakeOrthanc(_feed(("StableSeries", "a"), ("StableSeries", "b")), {"a": _tags(1), "b": _tags(2)})
    watcher, lines = _watcher(orthanc, state, handle, max_attempts=2)
    assert watcher.run(once=True) == 2
    assert [(r.status, r.attempts) for r in state.rows()] == [("parked", 2), ("parked", 2)]
    assert len(handle.refs) == 4
    assert "parked 1.2.3.1 after 2 attempts: pacs: the server cannot be reached" in lines
    table = status_table(state.rows())
    assert "parked       2  1.2.3.1" in table
    assert table.count("pacs: the server cannot be reached") == 2
    assert table.splitlines()[-1] == "2 parked"


def test_watcher_error_of_other_exceptions_names_their_type(state):
    handle = Handler(failures=10**6, error=KeyError("x"))
    watcher, _ = _watcher(FakeOrthanc(_feed(("StableSeries", "a")), {"a": _tags(1)}), state, handle)
    assert watcher.run(once=True) == 1
    assert state.rows()[0].last_error == "KeyError: 'x'"


class Killed(BaseException):
    pass


def test_watcher_requeues_series_left_running(tmp_path):
    path = tmp_path / "state.sqlite"
    orthanc = FakeOrthanc(_feed(("StableSeries", "b"), ("StableSeries", "a")), {"a": _tags(1), "b": _tags(2)})
    first = WatchState(path)
    killer = Handler(failures=1, error=Killed())
    killer.refs.append(SeriesRef(DICOMWEB, "1.2.3", "1.2.3.2"))  # b: its one failure already spent
    with pytest.raises(Killed):
        _watcher(orthanc, first, killer)[0].run(once=True)
    first.close()
    again = WatchState(path)
    try:
        assert [(r.series_uid, r.status) for r in again.rows()] == [
            ("1.2.3.2", "done"),
            ("1.2.3.1", "running"),
        ]
        handle = Handler()
        watcher, lines = _watcher(orthanc, again, handle)
        assert watcher.run(once=True) == 0
        assert [r.series_uid for r in handle.refs] == ["1.2.3.1"]
        assert "requeued 1.2.3.1 (left running by a stopped watcher)" in lines
        assert [(r.series_uid, r.status, r.attempts) for r in again.rows()] == [
            ("1.2.3.2", "done", 1),
            ("1.2.3.1", "done", 2),
        ]
    finally:
        again.close()


def test_watcher_reads_every_feed_page(state):
    entries = [("StableSeries", f"s{i}") for i in range(1, 6)] + [("NewSeries", "s1")]
    orthanc = FakeOrthanc(_feed(*entries), {f"s{i}": _tags(i) for i in range(1, 6)}, page=2)
    handle = Handler()
    watcher, _ = _watcher(orthanc, state, handle)
    assert watcher.read_feed() == 5
    assert orthanc.since_calls == [0, 2, 4]
    assert state.last_seq == 6
    watcher.run(once=True)
    assert [r.series_uid for r in handle.refs] == [f"1.2.3.{i}" for i in range(1, 6)]


def test_watcher_skips_series_deleted_since_the_change(state):
    class Gone(FakeOrthanc):
        def series_info(self, orthanc_id):
            if orthanc_id == "gone":
                raise DicomwebError("http://orthanc:8042/series/gone: not found (HTTP 404)")
            return super().series_info(orthanc_id)

    orthanc = Gone(_feed(("StableSeries", "gone"), ("StableSeries", "a")), {"a": _tags(1)})
    handle = Handler()
    _watcher(orthanc, state, handle)[0].run(once=True)
    assert [r.series_uid for r in handle.refs] == ["1.2.3.1"]


def test_status_table():
    assert status_table([]) == "no series recorded yet"


def test_status_table_lists_parked_with_error(state):
    state.record([_series(1, "chest"), _series(2)], 2)
    state.start("1.2.3.1")
    state.fail("1.2.3.1", "HTTP 500 from pacs", max_attempts=1, retry_delay=1.0)
    state.start("1.2.3.2")
    state.finish("1.2.3.2", {})
    lines = status_table(state.rows()).splitlines()
    assert lines == [
        "status   tries  series",
        "parked       1  1.2.3.1  chest",
        "                HTTP 500 from pacs",
        "done         1  1.2.3.2",
        "1 done, 1 parked",
    ]
