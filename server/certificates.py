"""The consortium's keys and certificates: its CA, the SuperLink's TLS certificate and the Ed25519 release key.

Everything here is ``cryptography``'s X.509 and key serialisation; nothing is hand-rolled. Private keys
are written 0600 from their creation on (``fedmeta.server.consortium_files.write_file``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeta.server.consortium_files import Provisioned, write_file

CURVE = ec.SECP384R1()  # a NIST curve, as `flwr supernode register` requires
CA_DAYS = 3650
CERT_DAYS = 397  # the longest server-certificate lifetime browsers still accept; renew yearly


def certificate_authority(out: Path, now, force: bool, result: Provisioned, need_key: bool):
    """The CA (made when there is none, or with ``force``); its key only when ``need_key`` (it may be offline)."""
    ca_dir = out / "ca"
    key_path, cert_path = ca_dir / "ca.key", ca_dir / "ca.crt"
    if cert_path.exists() and not force:
        result.kept.append(str(cert_path))
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not key_path.exists():
            if need_key:
                raise FileNotFoundError(
                    f"{key_path} is not here (kept offline?); it is needed to sign the SuperLink certificate. Bring "
                    "it back for this command, then store it offline again.")
            return None, cert
        return serialization.load_pem_private_key(key_path.read_bytes(), password=None), cert
    if key_path.exists() and not force:
        raise FileExistsError(f"{ca_dir} holds ca.key without ca.crt; restore ca.crt or start over with --force.")
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmeta consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedmeta consortium CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_file(key_path, pem_private(key), 0o600, out=out)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, out=out)
    result.created += [str(cert_path), str(key_path)]
    return key, cert


def release_key_pair(out: Path, force: bool, result: Provisioned) -> bytes:
    """The consortium's Ed25519 release key pair (``fedmeta sign --key release/release.key``; the ServerApp's
    ``release-key``); made when there is none, or with ``force``. Returns the public key (PEM), which every
    site bundle carries as ``release.pub``: the key ``adapt``, ``evaluate`` and ``predict`` verify with by
    default. The private key may be kept offline once made: ``release.pub`` alone is enough here."""
    key_path, pub_path = out / "release" / "release.key", out / "release" / "release.pub"
    if pub_path.is_file() and not force:
        result.kept.append(str(pub_path))
        return pub_path.read_bytes()
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_file(key_path, pem_private(key), 0o600, out=out)
    write_file(pub_path, public, 0o644, out=out)
    result.created += [str(pub_path), str(key_path)]
    return public


def server_certificate(out: Path, names: list[str], ca_key, ca_cert, now, days: int):
    server_dir = out / "superlink"
    key = ec.generate_private_key(CURVE)
    alt_names = [alt_name(name) for name in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    write_file(server_dir / "server.key", pem_private(key), 0o600, out=out)
    write_file(server_dir / "server.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644, out=out)
    write_file(server_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644, out=out)  # --ssl-ca-certfile
    return cert


def alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name):
        raise ValueError(f"--server-name {name!r}: give a DNS name (letters, digits, dots, dashes; punycode for "
                         "international names) or an IP address, without a port")
    return x509.DNSName(name)


def pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def expiry(cert: x509.Certificate) -> str:
    return cert.not_valid_after_utc.date().isoformat()


__all__ = ["CA_DAYS", "CERT_DAYS", "CURVE", "alt_name", "certificate_authority", "expiry", "pem_private",
           "release_key_pair", "server_certificate"]
