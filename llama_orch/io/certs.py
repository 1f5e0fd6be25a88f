"""A development certificate authority and the daemons' certificates (``llama-orch certs DIR``).

For tests, ``llama-orch up --tls`` and trying mTLS out; production certificates come from the
operator's own CA (cert-manager, Vault, an internal PKI). The CA signs one certificate per
service, each usable as a server and as a client (mTLS), for the host names and addresses
given (loopback always). Keys are P-256, written with mode 0600; every file is written whole
(a temporary file renamed into place), so a daemon reloading its certificate never reads half
of one. An existing CA in DIR is reused, so new or renewed service certificates stay trusted.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The services ``llama-orch certs`` issues for by default (``client``: operators' tools and scrapers).
SERVICES = ("orchestratord", "pool-managerd", "engine-provisioner", "client")
#: Each service's environment prefix: ``{prefix}_TLS_CERT/KEY/CA`` (the CLI's own are
#: ``LLAMA_ORCH_CA/CERT/KEY``: see ``ServiceCert.env``).
ENV_PREFIXES = {"orchestratord": "ORCHD", "pool-managerd": "POOL_MANAGERD", "engine-provisioner": "ENGINE_PROVISIONER",
                "client": "LLAMA_ORCH"}
LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceCert:
    name: str
    cert: Path
    key: Path
    ca: Path

    def env(self, prefix: str) -> dict[str, str]:
        """The daemon's ``{prefix}_TLS_CERT/KEY/CA`` variables (the CLI's: ``LLAMA_ORCH_CERT/KEY/CA``)."""
        if prefix == "LLAMA_ORCH":
            return {"LLAMA_ORCH_CERT": str(self.cert), "LLAMA_ORCH_KEY": str(self.key), "LLAMA_ORCH_CA": str(self.ca)}
        return {f"{prefix}_TLS_CERT": str(self.cert), f"{prefix}_TLS_KEY": str(self.key), f"{prefix}_TLS_CA": str(self.ca)}


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llama-orch development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def ensure_ca(directory: Path, *, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in ``directory`` (``ca.pem``, ``ca-key.pem``), made when there is none."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC key made by llama-orch certs")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("llama-orch development CA")
    start = _now() - datetime.timedelta(minutes=5)  # a little slack for clocks of other hosts
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys((*LOOPBACK, *hosts)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(directory: Path, name: str, *, hosts: tuple[str, ...] = (), days: int = 90,
          ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None) -> ServiceCert:
    """``{name}.pem`` and ``{name}-key.pem`` in ``directory``, signed by its CA, for server and client use."""
    ca_key, ca_cert = ca or ensure_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    # two files, two renames: a daemon reloading between them finds the pair mismatched and keeps
    # its previous one until its next check (``TlsContexts.reload_if_changed``)
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ServiceCert(name=name, cert=cert_path, key=key_path, ca=directory / "ca.pem")


def make_dev_certs(directory: Path, *, services: tuple[str, ...] = SERVICES, hosts: tuple[str, ...] = (),
                   days: int = 90) -> dict[str, ServiceCert]:
    """The CA (reused when present) and a fresh certificate for each service."""
    ca = ensure_ca(directory)
    return {name: issue(directory, name, hosts=hosts, days=days, ca=ca) for name in services}
