"""Who may talk to the split-learning server: TLS certificates, client tokens, and the plaintext guard.

`make_certificates` (or `python -m qtl_jax.split.remote.security --out DIR`) writes into DIR:

    ca.pem, ca.key           a self-signed CA (EC P-256) that signs everything below
    server.pem, server.key   the server's certificate: subjectAltNames = the hosts (DNS names and IP addresses),
                             extendedKeyUsage serverAuth
    CLIENT.pem, CLIENT.key   one per client id: CN = the client id, extendedKeyUsage clientAuth (for mutual TLS)
    tokens.txt               'CLIENT_ID TOKEN' per line: the server's list of who may connect
    CLIENT.token             just that client's token: what the client sends

Every private key and token file is written with mode 0o600, atomically (a temporary file in the same folder,
then os.replace), so a reader never sees half a key and no other user can read one at any moment.

`server_credentials` / `channel_credentials` turn those files into gRPC credentials (with a client CA, the server
requires client certificates signed by it). `read_tokens` / `read_token` parse token files and refuse malformed
ones; `token_matches` checks a presented token in constant time. `check_plaintext_allowed` refuses insecure
(plaintext) gRPC on anything but a loopback address, where nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import datetime
import hmac
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Sequence

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MIN_TOKEN_LENGTH = 16
TOKENS_FILE = "tokens.txt"
# Client ids become file names next to these, so they may not collide with them.
RESERVED_IDS = ("ca", "server", "tokens")
# A client id is a file name and one whitespace-free word in tokens.txt.
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Certificates start this much in the past, so a peer whose clock lags a little still accepts them.
CLOCK_SKEW = datetime.timedelta(minutes=5)


# --- writing files -------------------------------------------------------------------------------------------


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    """Writes `data` to `path` via a temporary file in the same folder and os.replace. mkstemp creates the file
    0o600, so a secret is never readable by others, not even before the chmod."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- certificates --------------------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    """An IP address SAN for a literal address (TLS clients match IP targets only against those), else DNS."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime,
             days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _make_ca(now: datetime.datetime, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("qtl_jax split CA")
    cert = (_builder(name, name, key.public_key(), now, days)
            # path_length=0: the CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _make_leaf(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, common_name: str,
               sans: Sequence[x509.GeneralName], usage: x509.ObjectIdentifier, now: datetime.datetime,
               days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An end-entity certificate signed by the CA; `usage` (serverAuth or clientAuth) is its only EKU, so a
    client certificate cannot serve as a server's and vice versa."""
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (_builder(_name(common_name), ca_cert.subject, key.public_key(), now, days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _check_client_ids(clients: Sequence[str]) -> None:
    for cid in clients:
        if not CLIENT_ID_RE.fullmatch(cid) or cid in RESERVED_IDS:
            raise ValueError(f"client id {cid!r} must match {CLIENT_ID_RE.pattern} and not be one of {RESERVED_IDS}")
    if len(set(clients)) != len(clients):
        raise ValueError(f"duplicate client ids in {list(clients)}")


def make_certificates(out_dir: str, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
                      clients: Sequence[str] = ("client0",), days: int = 30) -> dict[str, str]:
    """A self-signed CA (ca.pem, ca.key), a server certificate for `hosts` (server.pem, server.key; DNS names
    and IP addresses as subjectAltNames as appropriate; serverAuth EKU) and one client certificate per client id
    (CLIENT.pem, CLIENT.key; CN = client id; clientAuth EKU), all signed by the CA; EC P-256 keys; private keys
    written with mode 0o600 and written atomically (temp file + os.replace). Returns {name: path}.
    Also writes tokens.txt: one line per client 'CLIENT_ID TOKEN' (secrets.token_urlsafe(32)), mode 0o600, and
    CLIENT.token holding just that client's token (0o600).

    Names in the result are the file names ("ca.pem", "client0.token", ...). Existing files of those names are
    replaced (a new CA invalidates every certificate it did not sign). `out_dir` is created 0o700 if missing.
    """
    hosts, clients = list(hosts), list(clients)
    if not hosts:
        raise ValueError("make_certificates needs at least one host for the server certificate")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    _check_client_ids(clients)
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    files: dict[str, tuple[bytes, int]] = {}  # name -> (content, mode)
    ca_cert, ca_key = _make_ca(now, days)
    files["ca.pem"], files["ca.key"] = (_cert_pem(ca_cert), 0o644), (_key_pem(ca_key), 0o600)
    cert, key = _make_leaf(ca_cert, ca_key, hosts[0], [_san(h) for h in hosts], ExtendedKeyUsageOID.SERVER_AUTH,
                           now, days)
    files["server.pem"], files["server.key"] = (_cert_pem(cert), 0o644), (_key_pem(key), 0o600)
    tokens = {cid: secrets.token_urlsafe(32) for cid in clients}
    for cid in clients:
        cert, key = _make_leaf(ca_cert, ca_key, cid, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, days)
        files[f"{cid}.pem"], files[f"{cid}.key"] = (_cert_pem(cert), 0o644), (_key_pem(key), 0o600)
        files[f"{cid}.token"] = (tokens[cid].encode() + b"\n", 0o600)
    files[TOKENS_FILE] = ("".join(f"{cid} {tok}\n" for cid, tok in tokens.items()).encode(), 0o600)

    paths = {}
    for name, (data, mode) in files.items():
        paths[name] = os.path.join(out_dir, name)
        _write_atomic(paths[name], data, mode)
    return paths


# --- gRPC credentials ----------------------------------------------------------------------------------------


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """TLS server credentials; with client_ca_file, mutual TLS: client certificates signed by that CA are required.
    Reads the PEM files `cert_file` (the server certificate, e.g. server.pem) and `key_file` (its key)."""
    pair = (_read_bytes(key_file, "TLS key"), _read_bytes(cert_file, "TLS certificate"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read_bytes(client_ca_file, "client CA"),
                                       require_client_auth=True)


def channel_credentials(ca_file: str, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials that trust only the CA in `ca_file` (not the system roots: the server's certificate
    comes from our own CA). With `cert_file` and `key_file` (both or neither), the client presents that
    certificate, for a server that requires mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("channel_credentials: give both cert_file and key_file, or neither")
    ca = _read_bytes(ca_file, "CA certificate")
    if cert_file is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=_read_bytes(key_file, "TLS key"),
                                        certificate_chain=_read_bytes(cert_file, "TLS certificate"))


# --- tokens --------------------------------------------------------------------------------------------------


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None


def parse_tokens(text: str, source: str = "<tokens>") -> dict[str, str]:
    """`read_tokens` on a string; `source` names it in errors."""
    tokens: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{source}:{number}: expected 'CLIENT_ID TOKEN', got {len(fields)} fields")
        cid, token = fields
        if cid in tokens:
            raise ValueError(f"{source}:{number}: duplicate client id {cid!r} (first on line {first_line[cid]})")
        # The token itself never goes into the message: errors end up in logs.
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"{source}:{number}: token of client {cid!r} has {len(token)} characters, "
                             f"fewer than {MIN_TOKEN_LENGTH}")
        tokens[cid], first_line[cid] = token, number
    return tokens


def read_tokens(path: str) -> dict[str, str]:
    """Parses a tokens file ('CLIENT_ID TOKEN' per line, '#' comments and blank lines ignored). Raises ValueError naming
    the file and line number for a malformed line, a duplicate client id, or a token shorter than 16 characters;
    FileNotFoundError naming the file. A file without any token parses to {} (a server using it admits nobody)."""
    return parse_tokens(_read_text(path, "tokens"), source=path)


def read_token(path: str) -> str:
    """One client's token from a file such as CLIENT.token, stripped. FileNotFoundError naming a missing file;
    ValueError for an empty file or one with more than one word (e.g. a line of tokens.txt given by mistake)."""
    words = _read_text(path, "token").split()
    if not words:
        raise ValueError(f"token file {path} is empty")
    if len(words) > 1:
        raise ValueError(f"token file {path} holds {len(words)} words, expected just the token "
                         f"(tokens.txt is the server's file; a client reads CLIENT.token)")
    return words[0]


def token_matches(tokens: dict[str, str], client_id: str, token: str) -> bool:
    """Constant time in the token (hmac.compare_digest on bytes); an unknown client id is compared against a dummy
    token of the same length so the timing does not tell which ids exist."""
    presented = token.encode("utf-8")
    expected = tokens.get(client_id)
    # The dummy has the presented token's length, so the comparison does the same work as for a known id; it may
    # equal what was presented (all zero bytes), hence the `known` check after the comparison, not before.
    reference = expected.encode("utf-8") if expected is not None else bytes(len(presented))
    equal = hmac.compare_digest(reference, presented)
    return equal and expected is not None


# --- the plaintext guard -------------------------------------------------------------------------------------


def _host(address: str) -> str | None:
    """HOST of 'HOST:PORT' or '[IPv6]:PORT'; None when the address has neither form."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or not address[end + 1:].startswith(":"):
            return None
        return address[1:end]
    host, sep, _ = address.rpartition(":")
    # An unbracketed host with a colon would be an IPv6 address whose port cannot be told apart from it.
    if not sep or ":" in host:
        return None
    return host


def is_loopback(address: str) -> bool:
    """True when HOST of 'HOST:PORT' (or '[IPv6]:PORT') is localhost, 127.0.0.0/8 or ::1 (use ipaddress).

    Anything else is False, including addresses it cannot parse, wildcard binds ('0.0.0.0', '[::]': they listen
    on every interface) and gRPC URIs ('dns:///...', 'unix:...'): the guard fails closed."""
    host = _host(address)
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    # ::ffff:127.0.0.1 is 127.0.0.1 seen through an IPv6 socket.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_plaintext_allowed(address: str) -> None:
    """Raises ValueError ('plaintext (insecure) gRPC is only allowed on loopback addresses, got ...') otherwise.
    Plaintext would send activations, gradients and tokens readable and forgeable by anyone on the path."""
    if not is_loopback(address):
        raise ValueError(f"plaintext (insecure) gRPC is only allowed on loopback addresses, got {address!r}; "
                         f"use TLS (make certificates with `python -m qtl_jax.split.remote.security --out DIR`)")


# --- command line --------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """python -m qtl_jax.split.remote.security --out DIR [--hosts h1,h2] [--clients a,b] [--days N]"""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write into (created 0o700 if missing)")
    parser.add_argument("--hosts", default="localhost,127.0.0.1,::1",
                        help="comma-separated names and addresses the server is reached by")
    parser.add_argument("--clients", default="client0", help="comma-separated client ids")
    parser.add_argument("--days", type=int, default=30, help="validity of every certificate, in days")
    args = parser.parse_args(argv)

    paths = make_certificates(args.out, _csv(args.hosts), _csv(args.clients), args.days)
    print(f"wrote {len(paths)} files to {args.out}:")
    for name, path in paths.items():
        print(f"  {name:<20} {path}")
    client = (_csv(args.clients) or ["CLIENT"])[0]
    d = args.out
    print("\nserver (add --tls_client_ca ca.pem for mutual TLS):")
    print(f"  python -m qtl_jax.split.remote.server --tls_cert {d}/server.pem --tls_key {d}/server.key "
          f"--tokens {d}/{TOKENS_FILE}")
    print(f"client {client} (add --tls_cert/--tls_key {client}.pem/{client}.key for mutual TLS):")
    print(f"  python -m qtl_jax.split.remote.client --tls_ca {d}/ca.pem --client_id {client} "
          f"--token_file {d}/{client}.token")
    print("\nKeep ca.key offline; give each client only ca.pem and its own .pem/.key/.token files.")


if __name__ == "__main__":
    main()
