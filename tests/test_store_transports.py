"""The Redis store over a Unix socket and over TLS, against private redis-servers started here.

One redis-server listens on a Unix socket only (``--port 0``), another on a TLS port only, with a
certificate for 127.0.0.1 and localhost signed by a CA made here; a second CA signs nothing the
server shows. Through stack.yaml and through the store itself: sessions and rate-limit counts go
there and come back, /readyz says the store is ok, and a URL that cannot work is named clearly.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import pytest
import redis
from conftest import REQUIRE_REDIS, free_port
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from webtest import TestApp

from config import ConfigError
from config.live import LiveStack
from stores.redis import RedisStore

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "tls-s3cret"
TLS_FAILED = "TLS handshake failed (rediss:// to a port without TLS, or a certificate that does not verify)"
STACK = """app: {{factory: "test_store_transports:visits_app"}}
stores:
  shared: "{url}"
pipeline:
  - errors: {{}}
  - health: {{}}
  - ratelimit: {{store: shared, limits: ["3/minute"]}}
  - session: {{store: shared, secret_key: "{key}", cookie_name: sid, cookie_secure: false}}
"""


def visits_app(options: dict[str, Any] | None = None) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """Counts the visits of one session in the session itself."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        session = environ["wsgistack.session"]
        session["visits"] = session.get("visits", 0) + 1
        body = json.dumps({"visits": session["visits"]}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def _binary() -> str:
    """redis-server's path; without one the test fails when Redis is required, else it is skipped."""
    binary = shutil.which("redis-server")
    if binary is None:
        if REQUIRE_REDIS:
            pytest.fail("WSGISTACK_REQUIRE_REDIS=1 but redis-server is not installed")
        pytest.skip("redis-server is not installed")
    return binary


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
                 issuer_key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
    """A CA's self-signed certificate, or (with an issuer) a server's for 127.0.0.1 and localhost."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                                          critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


class Certificates:
    """A CA and the server certificate it signed, and another CA that signed nothing of the server's."""

    def __init__(self, directory: Path) -> None:
        ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        ca = _certificate("wsgistack test CA", ca_key)
        server = _certificate("localhost", server_key, ca.subject, ca_key)
        pem = serialization.Encoding.PEM
        self.ca = _write_pem(directory / "ca.pem", ca.public_bytes(pem))
        self.other_ca = _write_pem(directory / "other-ca.pem",
                                   _certificate("wsgistack other CA", other_key).public_bytes(pem))
        self.server = _write_pem(directory / "server.pem", server.public_bytes(pem))
        self.server_key = _write_pem(directory / "server.key", _key_pem(server_key))


class Server:
    """A private redis-server started with ``args``, answering ``client`` before it is handed out."""

    def __init__(self, directory: Path, args: list[str], client: redis.Redis, port: int = 0) -> None:
        self.port = port
        self.log = directory / "redis.log"
        self.proc = subprocess.Popen(
            [_binary(), *args, "--save", "", "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
             "--logfile", str(self.log)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = client
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    said = self.log.read_text() if self.log.exists() else ""
                    self.stop()
                    pytest.fail(f"redis-server {' '.join(args)} did not start: {said[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A redis-server on a Unix socket only (mode 700), no TCP port."""
    directory = tmp_path_factory.mktemp("unix")
    sock = directory / "redis.sock"
    server = Server(directory, ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"],
                    redis.Redis(unix_socket_path=str(sock), db=2, socket_timeout=0.5))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Certificates) -> Iterator[Server]:
    """A redis-server on a TLS port only, with a password; clients show no certificate of their own."""
    directory = tmp_path_factory.mktemp("tls")
    port = free_port()
    server = Server(directory, ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                                "--tls-cert-file", str(certs.server), "--tls-key-file", str(certs.server_key),
                                "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
                                "--requirepass", PASSWORD],
                    redis.Redis(host="127.0.0.1", port=port, password=PASSWORD, ssl=True,
                                ssl_ca_certs=str(certs.ca), socket_timeout=0.5), port)
    yield server
    server.stop()


def _tls_url(server: Server, ca: Path | None, host: str = "127.0.0.1", reqs: str = "required",
             password: str = PASSWORD) -> str:
    query = f"ssl_ca_certs={ca}&" if ca is not None else ""
    return f"rediss://:{quote(password)}@{host}:{server.port}/0?{query}ssl_cert_reqs={reqs}"


@pytest.fixture
def unix_url(unix_server: Server) -> str:
    """The Unix socket's URL, database 2; every database empty."""
    unix_server.client.flushall()
    return f"unix://{unix_server.client.connection_pool.connection_kwargs['path']}?db=2"


@pytest.fixture
def tls_url(tls_server: Server, certs: Certificates) -> str:
    """The TLS server's URL, verifying its certificate against the CA; every database empty."""
    tls_server.client.flushall()
    return _tls_url(tls_server, certs.ca)


@pytest.fixture(params=["unix", "tls"])
def transport(request: pytest.FixtureRequest) -> tuple[str, Server]:
    """Each transport in turn: (the store URL, its server)."""
    url = str(request.getfixturevalue(f"{request.param}_url"))
    return url, request.getfixturevalue(f"{request.param}_server")


def _masked(url: str) -> str:
    return url.replace(f":{quote(PASSWORD)}@", ":***@")


def _write(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "stack.yaml"
    path.write_text(STACK.format(url=url, key="k" * 8 + "-session-key-of-the-transport-tests"))
    return path


def test_the_store_round_trips_a_session_and_a_count(transport: tuple[str, Server]) -> None:
    url, server = transport
    store = RedisStore(url)
    try:
        assert store.url == _masked(url)
        assert store.probe() is None  # PING, ROLE, a write, a script and a transaction all pass
        store.set("session:abc", b'{"user": 7}', ttl=60)
        assert store.get("session:abc") == b'{"user": 7}'
        assert [store.incr("count", ttl=60) for _ in range(3)] == [1, 2, 3]
        left = store.ttl("count")
        assert left is not None and 0 < left <= 60
        facts = store.health()
        assert (facts["ok"], facts["backend"], facts["url"], facts["breaker"]) == (
            True, "RedisStore", _masked(url), "closed")
        # On the server itself, in the URL's database (2 on the socket, 0 over TLS), with the store's prefix.
        db = 2 if url.startswith("unix:") else 0
        raw = server.client
        assert _keys(raw, db) == [b"wsgistack:count", b"wsgistack:ping", b"wsgistack:session:abc"]  # ping: probe()
        assert _keys(raw, 2 - db) == []
    finally:
        store.close()


def _keys(client: redis.Redis, db: int) -> list[bytes]:
    """The keys of database ``db`` of the server ``client`` talks to."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs["db"] = db
    other = redis.Redis(connection_pool=client.connection_pool.__class__(
        connection_class=client.connection_pool.connection_class, **kwargs))
    try:
        return sorted(cast(list[bytes], other.keys("*")))
    finally:
        other.close()


def test_a_stack_keeps_sessions_and_counts_there(tmp_path: Path, transport: tuple[str, Server]) -> None:
    url, server = transport
    live = LiveStack(_write(tmp_path, url))
    try:
        client = TestApp(live)
        ready = client.get("/readyz").json
        assert ready["status"] == "ok"
        shared = ready["stores"]["shared"]
        assert (shared["ok"], shared["backend"], shared["breaker"]) == (True, "RedisStore", "closed")
        assert "url" not in shared and "sock" not in json.dumps(ready)  # a probe is not told where the store is
        answers = [client.get("/visit") for _ in range(3)]
        assert [a.json["visits"] for a in answers] == [1, 2, 3]  # the session was stored and read back
        assert [a.headers["RateLimit-Remaining"] for a in answers] == ["2", "1", "0"]
        assert client.get("/visit", status=429).headers["Retry-After"]
        # A second stack on the same store (another process, a restart) sees the same counts.
        again = LiveStack(_write(tmp_path, url))
        try:
            assert TestApp(again).get("/visit", status=429).status_int == 429
        finally:
            again.current.close()
        db = 2 if url.startswith("unix:") else 0
        keys = _keys(server.client, db)
        assert keys and all(key.startswith(b"wsgistack:") for key in keys)
        assert _keys(server.client, 2 - db) == []
    finally:
        live.current.close()


def test_localhost_is_verified_as_well(tls_server: Server, certs: Certificates) -> None:
    """The certificate names 127.0.0.1 and localhost: the host name is checked, and passes."""
    store = RedisStore(_tls_url(tls_server, certs.ca, host="localhost"))
    try:
        assert store.probe() is None
    finally:
        store.close()


REFUSED = [
    pytest.param({"ca": "other_ca"}, TLS_FAILED, id="a certificate another CA signed"),
    pytest.param({"password": "not-this"}, "authentication failed (a wrong or missing user name or password)",
                 id="a wrong password over TLS"),
]


@pytest.mark.parametrize(("change", "why"), REFUSED)
def test_a_tls_store_that_cannot_work_stops_the_start(tmp_path: Path, tls_server: Server, certs: Certificates,
                                                      change: dict[str, str], why: str) -> None:
    url = _tls_url(tls_server, getattr(certs, change.get("ca", "ca")), password=change.get("password", PASSWORD))
    path = _write(tmp_path, url)
    shown = url.replace(f":{quote(change.get('password', PASSWORD))}@", ":***@")
    with pytest.raises(ConfigError) as info:
        LiveStack(path)
    assert [str(p) for p in info.value.problems] == [f"{path}:3:11 stores.shared: store 'shared' ({shown}): {why}"]


def test_serve_refuses_a_certificate_that_does_not_verify(tmp_path: Path, tls_server: Server,
                                                          certs: Certificates) -> None:
    url = _tls_url(tls_server, certs.other_ca)
    path = _write(tmp_path, url)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, str(ROOT / "serve.py"), "-c", str(path), "serve"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{path}:3:11 stores.shared: store 'shared' ({_masked(url)}): {TLS_FAILED}" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr
    assert PASSWORD not in done.stderr + done.stdout


@pytest.mark.usefixtures("tls_url")  # an empty server: no counts from the tests before
@pytest.mark.parametrize("ca", ["other_ca", None], ids=["another CA", "no CA"])
def test_ssl_cert_reqs_none_connects_without_verifying(tmp_path: Path, tls_server: Server, certs: Certificates,
                                                       ca: str | None) -> None:
    url = _tls_url(tls_server, getattr(certs, ca) if ca else None, reqs="none")
    live = LiveStack(_write(tmp_path, url))
    try:
        client = TestApp(live)
        assert client.get("/readyz").json["stores"]["shared"]["ok"] is True
        assert client.get("/visit").json["visits"] == 1
    finally:
        live.current.close()


def test_a_socket_path_that_does_not_exist_is_not_ready(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No socket there: Redis may start after this process, so the start goes on and /readyz says why."""
    url = f"unix://{tmp_path / 'nowhere' / 'redis.sock'}?db=2"
    with caplog.at_level(logging.WARNING, logger="wsgistack.stores"):
        live = LiveStack(_write(tmp_path, url))
    try:
        assert f"store 'shared' ({url}) does not answer yet: not reachable;" in caplog.text
        ready = TestApp(live).get("/readyz", status=503).json
        assert (ready["status"], ready["stores"]["shared"]["ok"], ready["stores"]["shared"]["error"]) == (
            "degraded", False, "not reachable")
    finally:
        live.current.close()
