"""Container HEALTHCHECK: ``python healthcheck.py PORT`` exits 0 when
``http(s)://127.0.0.1:PORT/healthz`` answers 200, else 1.

Both images use it (no curl in them): the agent's web port (8080) and the hub's (8443).
Plain HTTP is tried first; a server with TLS (``web.tls_cert``, ``cloud-hub run
--tls-cert``) answers HTTPS on the same port. The certificate is not checked: the request
never leaves the container's loopback, and the certificate names the host, not 127.0.0.1.
Kubernetes ignores HEALTHCHECK and uses the probes in deploy/k3s instead.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request


def healthy(port: int, timeout_s: float = 3.0) -> bool:
    """True if ``/healthz`` on ``127.0.0.1:port`` answers 200 over HTTP or HTTPS."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    for scheme, context in (("http", None), ("https", insecure)):
        url = f"{scheme}://127.0.0.1:{port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s, context=context) as resp:  # noqa: S310 - fixed loopback URL
                if resp.status == 200:
                    return True
        except Exception:  # noqa: S112 - refused, reset, TLS mismatch, timeout: try the next scheme
            continue
    return False


def main(argv: list[str]) -> int:
    port = int(argv[1]) if len(argv) > 1 else 8080
    return 0 if healthy(port) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
