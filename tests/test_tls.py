"""TLS and mTLS: certificates are made inside the test (a throwaway CA, server and client certificates)."""

from __future__ import annotations

import datetime as dt
import ipaddress

import grpc
import pytest
from server_fixtures import ServerThread, load_engine, test_config

from specdec.client import Client
from specdec.types import Method

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, usage=None, san=None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))  # fmt: skip
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None) -> str:
    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())  # fmt: skip
    path.write_bytes(data)
    return str(path)


def make_pki(root, tag: str) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by that CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"specdec test CA {tag}", ca_key, _name(f"specdec test CA {tag}"), ca_key, ca=True)
    skey, ckey, c2key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert("localhost", skey, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    client = _cert(f"client {tag}", ckey, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    client2 = _cert(f"second client {tag}", c2key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    root.mkdir(parents=True, exist_ok=True)
    return {
        "ca": _write(root / "ca.pem", ca),
        "server_cert": _write(root / "server.pem", server),
        "server_key": _write(root / "server.key", key=skey),
        "client_cert": _write(root / "client.pem", client),
        "client_key": _write(root / "client.key", key=ckey),
        "client2_cert": _write(root / "client2.pem", client2),
        "client2_key": _write(root / "client2.key", key=c2key),
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    return {"good": make_pki(root / "good", "good"), "other": make_pki(root / "other", "other")}


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return load_engine(tiny_dirs)


def _serve(engine, **kw) -> ServerThread:
    s = ServerThread(test_config(**kw), engine=engine)
    assert s.wait_ready()
    return s


def _ok(client: Client) -> None:
    r = client.generate("hello", max_new_tokens=2, timeout=30)
    assert r.summary.usage.completion_tokens == 2


def _refused(client: Client) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hello", max_new_tokens=2, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()  # the handshake fails
    return e.value


def test_tls_client_succeeds_and_plaintext_client_fails(engine, pki):
    g = pki["good"]
    s = _serve(engine, tls_cert=g["server_cert"], tls_key=g["server_key"])
    try:
        with Client(s.address, tls_ca=g["ca"]) as c:
            _ok(c)
            assert c.health() == "SERVING"
        with Client(s.address) as c:  # plaintext against TLS
            _refused(c)
        with Client(s.address, tls_ca=pki["other"]["ca"]) as c:  # a client that trusts another CA
            _refused(c)
        with Client(s.address, tls_ca=g["ca"]) as c:  # the server keeps serving
            _ok(c)
    finally:
        s.close()


def test_plaintext_server_still_serves_plaintext(engine):
    """The negative of the test above: without --tls-cert the same plaintext client succeeds."""
    s = _serve(engine)
    try:
        with Client(s.address) as c:
            _ok(c)
    finally:
        s.close()


def test_mtls_requires_a_client_certificate_from_the_ca(engine, pki):
    g, o = pki["good"], pki["other"]
    s = _serve(engine, tls_cert=g["server_cert"], tls_key=g["server_key"], tls_client_ca=g["ca"])
    try:
        with Client(s.address, tls_ca=g["ca"], tls_cert=g["client_cert"], tls_key=g["client_key"]) as c:
            _ok(c)
        with Client(s.address, tls_ca=g["ca"]) as c:  # no client certificate
            _refused(c)
        with Client(s.address, tls_ca=g["ca"], tls_cert=o["client_cert"], tls_key=o["client_key"]) as c:  # other CA
            _refused(c)
        with Client(s.address) as c:  # plaintext
            _refused(c)
        with Client(s.address, tls_ca=g["ca"], tls_cert=g["client_cert"], tls_key=g["client_key"]) as c:
            _ok(c)  # still serving
    finally:
        s.close()


def test_mtls_client_certificates_are_tenants(engine, pki):
    """Behind mTLS each client certificate is a tenant: the prompt blocks one client sent are in the prefix cache for
    its next request but not for another client's, and their suffix drafting keeps apart, with the same (empty)
    cache_scope. The control: over plaintext, where no one is identified, two clients share."""
    from specdec.engine.prefix_cache import BLOCK

    g = pki["good"]

    def cached(client, prompt, tail):
        r = client.generate(token_ids=prompt + [tail], max_new_tokens=2, ignore_eos=True, method="suffix", timeout=30)
        return r.summary.usage.cached_prompt_tokens

    prompt = [(11 * i) % 250 + 3 for i in range(150)]
    s = _serve(engine, tls_cert=g["server_cert"], tls_key=g["server_key"], tls_client_ca=g["ca"])
    try:
        with Client(s.address, tls_ca=g["ca"], tls_cert=g["client_cert"], tls_key=g["client_key"]) as a, \
                Client(s.address, tls_ca=g["ca"], tls_cert=g["client2_cert"], tls_key=g["client2_key"]) as b:  # fmt: skip
            assert [cached(a, prompt, 1), cached(a, prompt, 2)] == [0, 2 * BLOCK]
            assert [cached(b, prompt, 3), cached(b, prompt, 4)] == [0, 2 * BLOCK]  # not a's blocks: its own
    finally:
        s.close()
    scopes = set(engine._drafters[Method.SUFFIX].indexes)
    assert {"11:client good/", "18:second client good/"} <= scopes

    prompt = [(13 * i) % 250 + 3 for i in range(150)]
    s = _serve(engine)
    try:
        with Client(s.address) as a, Client(s.address) as b:
            assert [cached(a, prompt, 1), cached(b, prompt, 2)] == [0, 2 * BLOCK]
    finally:
        s.close()


def test_server_credentials_reject_half_configurations(pki):
    from specdec.serving.security import server_credentials

    g = pki["good"]
    with pytest.raises(ValueError, match="go together"):
        server_credentials(g["server_cert"], None)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        server_credentials(None, None, g["ca"])
    with pytest.raises(ValueError, match="could not read the TLS key"):
        server_credentials(g["server_cert"], g["server_key"] + ".missing")
    assert server_credentials(None, None) is None


def test_cli_health_over_mtls(engine, pki):
    from specdec.cli import main

    g = pki["good"]
    s = _serve(engine, tls_cert=g["server_cert"], tls_key=g["server_key"], tls_client_ca=g["ca"])
    try:
        base = ["health", "--address", s.address, "--timeout", "5"]
        assert main(base + ["--tls-ca", g["ca"], "--tls-cert", g["client_cert"], "--tls-key", g["client_key"]]) == 0
        assert main(base + ["--tls-ca", g["ca"]]) == 1  # no client certificate
        assert main(base) == 1  # plaintext
    finally:
        s.close()


def test_cli_serve_with_mtls_flags(tiny_dirs, pki, tmp_path):
    """`specdec serve --tls-cert --tls-key --tls-client-ca` end to end; a bad key path fails before loading."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from server_fixtures import wait_until

    g = pki["good"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "python") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    base = [sys.executable, "-m", "specdec.cli", "serve", "--target", tiny_dirs["target"], "--method", "none",
            "--host", "127.0.0.1", "--port", "0", "--no-metrics"]  # fmt: skip
    bad = subprocess.run(base + ["--tls-cert", g["server_cert"], "--tls-key", str(tmp_path / "nope.key")],
                         capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert bad.returncode == 2 and "could not read the TLS key" in bad.stderr
    half = subprocess.run(base + ["--tls-cert", g["server_cert"]], capture_output=True, text=True, timeout=60, env=env)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr

    port_file = tmp_path / "port"
    cmd = base + ["--port-file", str(port_file), "--tls-cert", g["server_cert"], "--tls-key", g["server_key"],
                  "--tls-client-ca", g["ca"]]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert wait_until(lambda: port_file.exists() or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        address = f"127.0.0.1:{int(port_file.read_text())}"
        good = dict(tls_ca=g["ca"], tls_cert=g["client_cert"], tls_key=g["client_key"])
        with Client(address, **good) as c:
            assert wait_until(lambda: _health_or_none(c) == "SERVING", 60)
            _ok(c)
        with Client(address, tls_ca=g["ca"]) as c:
            _refused(c)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert '"tls": "mtls"' in err
    assert "PRIVATE KEY" not in out + err  # the key's contents are never printed


def _health_or_none(c: Client):
    try:
        return c.health(timeout=2)
    except grpc.RpcError:
        return None
