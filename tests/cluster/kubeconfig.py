"""Writes kubeconfig files with the certificates embedded, so each file stands alone
(it can be copied or exported as KUBECONFIG without the PKI directory)."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from .pki import CertPair


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_kubeconfig(path: Path, server: str, ca: CertPair, client: CertPair,
                     user: str, cluster: str = "latencytrace") -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": cluster,
            "cluster": {"server": server, "certificate-authority-data": _b64(ca.cert_pem)},
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": _b64(client.cert_pem),
                "client-key-data": _b64(client.key_pem),
            },
        }],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": user}}],
        "current-context": cluster,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # helm warns about (and some tools refuse) group/world-readable kubeconfigs.
    path.chmod(0o600)
    return path
