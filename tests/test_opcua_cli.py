"""`vbatt opcua-user`, `opcua-cert`, `opcua-trust` as real processes, and the first start of the service."""

from __future__ import annotations

import io
import json

from conftest import run_vbatt
from cryptography import x509

from vbatt.opcua_models.config import OpcuaServerConfig
from vbatt.opcua_models.security import TrustList, UserStore, make_certificate
from vbatt.opcua_models.service import first_start


def test_user_add_stores_only_a_hash_and_the_password_verifies(tmp_path):
    state = tmp_path / "st"
    r = run_vbatt("opcua-user", "add", "alice", "--role", "operator", "--password-stdin", "--state-dir", str(state),
                  input="correct horse battery\n")
    assert r.returncode == 0, r.stderr
    text = (state / "users.json").read_text()
    assert "correct horse battery" not in text
    assert json.loads(text)["users"]["alice"]["role"] == "operator"
    store = UserStore(state / "users.json")
    assert store.verify("alice", "correct horse battery") == "operator"
    assert store.verify("alice", "wrong") is None
    assert store.verify("nobody", "correct horse battery") is None
    r = run_vbatt("opcua-user", "list", "--state-dir", str(state))
    assert r.stdout.split() == ["alice", "operator"]


def test_bad_user_input_is_refused_and_changes_nothing(tmp_path):
    state = tmp_path / "st"
    UserStore(state / "users.json").add("alice", "viewer", "first-password")
    before = (state / "users.json").read_bytes()
    for args, stdin in ((["add", "bob", "--role", "admin"], ""),  # no such role
                        (["add", "bob", "--password-stdin"], "short\n"),  # too short
                        (["add", "alice", "--password-stdin"], "another-password\n"),  # exists
                        (["add", "bad name!", "--password-stdin"], "long-enough-pass\n")):
        r = run_vbatt("opcua-user", *args, "--state-dir", str(state), input=stdin)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert (state / "users.json").read_bytes() == before


def test_generated_password_is_printed_once(tmp_path):
    state = tmp_path / "st"
    r = run_vbatt("opcua-user", "add", "bob", "--role", "viewer", "--generate", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    password = r.stdout.strip().rsplit("password: ", 1)[1]
    assert UserStore(state / "users.json").verify("bob", password) == "viewer"


def test_cert_and_trust_commands(tmp_path):
    state = tmp_path / "st"
    r = run_vbatt("opcua-cert", "--client", "scada1", "--out", str(tmp_path / "out"), "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    server = x509.load_der_x509_certificate((state / "pki" / "own" / "cert.der").read_bytes())
    uris = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [OpcuaServerConfig().application_uri]
    client = x509.load_der_x509_certificate((tmp_path / "out" / "scada1.der").read_bytes())
    trust = TrustList(state)
    assert trust.check(client) == 0
    other_der, _ = make_certificate("other", "urn:other", server=False)
    other = x509.load_der_x509_certificate(other_der)
    assert trust.check(other) != 0  # untrusted until added
    (tmp_path / "other.der").write_bytes(other_der)
    r = run_vbatt("opcua-trust", "add", str(tmp_path / "other.der"), "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert trust.check(other) == 0
    r = run_vbatt("opcua-trust", "add", str(tmp_path / "users.json"), "--state-dir", str(state))
    assert r.returncode == 1


def test_first_start_creates_certificate_and_one_operator_once(tmp_path):
    cfg = OpcuaServerConfig(enabled=True, state_dir=str(tmp_path / "st"))
    out = io.StringIO()
    password = first_start(cfg, out)
    assert password and password in out.getvalue()
    assert UserStore(tmp_path / "st" / "users.json").verify("operator", password) == "operator"
    assert (tmp_path / "st" / "pki" / "own" / "cert.der").exists()
    assert first_start(cfg, io.StringIO()) is None  # users exist: nothing printed again
