"""Certificates verify and carry the right names; TLS and mutual TLS work (and refuse strangers) over a real
loopback gRPC connection; token files parse strictly; tokens compare safely; plaintext only on loopback."""

import contextlib
import ipaddress
import os
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qtl_jax.split.remote import security as S

TIMEOUT = 10  # seconds: every RPC and wait is bounded
METHOD = "/qtl_jax.test.Echo/Echo"
TOKEN = "t" * 20


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return S.make_certificates(str(tmp_path_factory.mktemp("pki")), clients=("client0", "client1"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA and its client: must not get into a server that trusts the first CA."""
    return S.make_certificates(str(tmp_path_factory.mktemp("pki_other")), clients=("client0",))


def _load(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


@contextlib.contextmanager
def _echo_server(creds):
    """A one-method generic service (bytes in, bytes back) on 127.0.0.1 at a free port; yields the port."""
    handler = grpc.method_handlers_generic_handler(
        "qtl_jax.test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
    try:
        port = server.add_secure_port("127.0.0.1:0", creds)  # port 0: the OS picks a free one
        assert port > 0
        server.start()
        yield port
    finally:
        server.stop(None)


def _call(channel) -> bytes:
    with channel:
        return channel.unary_unary(METHOD)(b"ping", timeout=TIMEOUT)


def _secure(port, creds, host="localhost", options=()):
    return grpc.secure_channel(f"{host}:{port}", creds, options=options)


def _fails_unavailable(channel):
    with pytest.raises(grpc.RpcError) as err:
        _call(channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# --- certificates --------------------------------------------------------------------------------------------


def test_make_certificates_files_modes_names_and_chain(certs):
    names = {"ca.pem", "ca.key", "server.pem", "server.key", "tokens.txt"}
    for cid in ("client0", "client1"):
        names |= {f"{cid}.pem", f"{cid}.key", f"{cid}.token"}
    assert set(certs) == names
    for name, path in certs.items():
        assert os.path.isfile(path), name
        if name.endswith((".key", ".token", ".txt")):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, name
    assert not [f for f in os.listdir(os.path.dirname(certs["ca.pem"])) if f.startswith(".tmp")]

    ca, server = _load(certs["ca.pem"]), _load(certs["server.pem"])
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("::1")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for cid in ("client0", "client1"):
        client = _load(certs[f"{cid}.pem"])
        client.verify_directly_issued_by(ca)
        assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == cid
        assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]

    tokens = S.read_tokens(certs["tokens.txt"])
    assert set(tokens) == {"client0", "client1"} and tokens["client0"] != tokens["client1"]
    assert S.read_token(certs["client1.token"]) == tokens["client1"]


def test_make_certificates_refuses_bad_client_ids(tmp_path):
    for clients in (["ca"], ["a b"], ["../x"], ["a", "a"]):
        with pytest.raises(ValueError):
            S.make_certificates(str(tmp_path), clients=clients)
    assert os.listdir(tmp_path) == []


def test_other_ca_does_not_verify(certs, other_certs):
    with pytest.raises(Exception):  # noqa: B017  (cryptography raises ValueError or InvalidSignature)
        _load(other_certs["client0.pem"]).verify_directly_issued_by(_load(certs["ca.pem"]))


# --- gRPC over TLS -------------------------------------------------------------------------------------------


def test_tls_round_trip(certs, other_certs):
    creds = S.server_credentials(certs["server.pem"], certs["server.key"])
    with _echo_server(creds) as port:
        ca = S.channel_credentials(certs["ca.pem"])
        assert _call(_secure(port, ca)) == b"ping"
        assert _call(_secure(port, ca, host="127.0.0.1")) == b"ping"  # matched against the IP address SAN
        _fails_unavailable(grpc.insecure_channel(f"127.0.0.1:{port}"))  # plaintext to a TLS server
        # A client that trusts another CA refuses the server.
        _fails_unavailable(_secure(port, S.channel_credentials(other_certs["ca.pem"])))


def test_tls_hostname_must_match_unless_overridden(tmp_path):
    """A certificate for another name is refused at 'localhost' unless the channel overrides the expected name."""
    paths = S.make_certificates(str(tmp_path), hosts=("split-server.internal",))
    with _echo_server(S.server_credentials(paths["server.pem"], paths["server.key"])) as port:
        ca = S.channel_credentials(paths["ca.pem"])
        _fails_unavailable(_secure(port, ca))
        override = (("grpc.ssl_target_name_override", "split-server.internal"),)
        assert _call(_secure(port, ca, options=override)) == b"ping"


def test_mutual_tls(certs, other_certs):
    creds = S.server_credentials(certs["server.pem"], certs["server.key"], client_ca_file=certs["ca.pem"])
    with _echo_server(creds) as port:
        _fails_unavailable(_secure(port, S.channel_credentials(certs["ca.pem"])))  # no client certificate
        own = S.channel_credentials(certs["ca.pem"], certs["client1.pem"], certs["client1.key"])
        assert _call(_secure(port, own)) == b"ping"
        # A client certificate from another CA (the client still trusts our server's CA).
        stranger = S.channel_credentials(certs["ca.pem"], other_certs["client0.pem"], other_certs["client0.key"])
        _fails_unavailable(_secure(port, stranger))
        # The server's own certificate lacks the clientAuth EKU, so it cannot stand in for a client's.
        _fails_unavailable(_secure(port, S.channel_credentials(certs["ca.pem"], certs["server.pem"],
                                                               certs["server.key"])))


def test_credentials_errors(certs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        S.server_credentials(str(tmp_path / "nope.pem"), certs["server.key"])
    with pytest.raises(FileNotFoundError, match=r"nope\.pem"):
        S.channel_credentials(str(tmp_path / "nope.pem"))
    with pytest.raises(ValueError, match="both"):
        S.channel_credentials(certs["ca.pem"], cert_file=certs["client0.pem"])


# --- tokens --------------------------------------------------------------------------------------------------


def _tokens_file(tmp_path, text):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    return str(path)


def test_read_tokens(tmp_path):
    good = _tokens_file(tmp_path, f"# the clients\n\nclient0 {TOKEN}\n  client1   {'u' * 16}  \n")
    assert S.read_tokens(good) == {"client0": TOKEN, "client1": "u" * 16}
    assert S.read_tokens(_tokens_file(tmp_path, "# nobody\n")) == {}

    with pytest.raises(ValueError, match=r"tokens\.txt:3: expected 'CLIENT_ID TOKEN'"):
        S.read_tokens(_tokens_file(tmp_path, f"client0 {TOKEN}\n\nclient1\n"))
    with pytest.raises(ValueError, match=r":2: expected"):
        S.read_tokens(_tokens_file(tmp_path, f"client0 {TOKEN}\nclient1 {TOKEN} extra\n"))
    with pytest.raises(ValueError, match=r":3: duplicate client id 'client0' \(first on line 1\)"):
        S.read_tokens(_tokens_file(tmp_path, f"client0 {TOKEN}\nclient1 {TOKEN}\nclient0 {'v' * 20}\n"))
    with pytest.raises(ValueError, match=r":1: token of client 'client0' has 15 characters") as err:
        S.read_tokens(_tokens_file(tmp_path, f"client0 {'s' * 15}\n"))
    assert "s" * 15 not in str(err.value)  # the secret stays out of error messages
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        S.read_tokens(str(tmp_path / "missing.txt"))


def test_read_token(tmp_path):
    path = tmp_path / "client0.token"
    path.write_text(f"  {TOKEN}\n")
    assert S.read_token(str(path)) == TOKEN
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        S.read_token(str(path))
    path.write_text(f"client0 {TOKEN}\n")
    with pytest.raises(ValueError, match="2 words"):
        S.read_token(str(path))
    with pytest.raises(FileNotFoundError, match=r"missing\.token"):
        S.read_token(str(tmp_path / "missing.token"))


def test_token_matches():
    tokens = {"client0": TOKEN, "client1": "u" * 20}
    assert S.token_matches(tokens, "client0", TOKEN)
    assert not S.token_matches(tokens, "client0", "x" * 20)
    assert not S.token_matches(tokens, "client0", TOKEN[:-1])
    assert not S.token_matches(tokens, "client0", "")
    assert not S.token_matches(tokens, "client1", TOKEN)  # another client's token
    assert not S.token_matches(tokens, "nobody", TOKEN)
    assert not S.token_matches(tokens, "nobody", "\0" * 20)  # equals the dummy, still refused
    assert not S.token_matches({}, "client0", TOKEN)


# --- plaintext guard -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:5", True), ("localhost:5", True), ("[::1]:5", True), ("127.1.2.3:5", True),
    ("LOCALHOST:5", True), ("[::ffff:127.0.0.1]:5", True),
    ("10.0.0.1:5", False), ("example.com:5", False), ("0.0.0.0:5", False), ("[::]:5", False),
    ("::1", False), ("[::1]", False), ("localhost", False), (":5", False), ("dns:///localhost:5", False),
])
def test_is_loopback(address, loopback):
    assert S.is_loopback(address) is loopback
    if loopback:
        S.check_plaintext_allowed(address)
    else:
        with pytest.raises(ValueError, match="plaintext \\(insecure\\) gRPC is only allowed on loopback addresses"):
            S.check_plaintext_allowed(address)


# --- command line --------------------------------------------------------------------------------------------


def test_main_writes_files(tmp_path, capsys):
    S.main(["--out", str(tmp_path), "--hosts", "localhost,10.1.2.3", "--clients", "a,b", "--days", "2"])
    assert {"ca.pem", "server.pem", "a.key", "b.token", "tokens.txt"} <= set(os.listdir(tmp_path))
    out = capsys.readouterr().out
    assert "--tls_cert" in out and "--tokens" in out and "a.token" in out
    sans = _load(tmp_path / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert set(S.read_tokens(str(tmp_path / "tokens.txt"))) == {"a", "b"}
