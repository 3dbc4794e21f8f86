"""A throwaway certificate authority for TLS tests, made with the ``openssl`` command line.

``TestCA(dir).server("gw")`` issues a certificate for 127.0.0.1/localhost (serverAuth),
``.client("edge")`` one for a client (clientAuth); each is a (certificate, key) pair of PEM
files. Keys are P-256, certificates carry the key identifiers Python's strict verification
wants. Two instances are two unrelated CAs (the "wrong CA" of a test).
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "mro-test-ca") -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cert = self.dir / f"{name}.pem"
        self.key = self.dir / f"{name}.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(self.key), "-out", str(self.cert), "-days", "2", "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash", cwd=self.dir)

    def _issue(self, name: str, usage: str, san: str) -> tuple[Path, Path]:
        cert, key, csr, ext = (self.dir / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
                 "-out", str(csr), "-subj", f"/CN={name}", cwd=self.dir)
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                 f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
        if san:
            lines.append(f"subjectAltName={san}")
        ext.write_text("\n".join(lines) + "\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=self.dir)
        return cert, key

    def server(self, name: str = "gateway") -> tuple[Path, Path]:
        return self._issue(name, "serverAuth", "IP:127.0.0.1,DNS:localhost")

    def client(self, name: str = "edge") -> tuple[Path, Path]:
        return self._issue(name, "clientAuth", "")
