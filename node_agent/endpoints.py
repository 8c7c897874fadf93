"""What an OTLP endpoint named in a LatencyTrace (`spec.export.otlpEndpoint`) may look like, in one place.

The CRD rejects anything else at admission (its pattern is PATTERN, its CEL rule the port range; a test
keeps them equal), the operator checks it again (the schema can be older than the operator, or bypassed)
and the agent once more, because it treats its LatencyTraceNode as untrusted input: a URL the OTLP
exporters cannot parse (`http://h:abc`, `http://h:99999`) used to end the agent's loop.

A base URL: scheme http, https or grpc; an ASCII host name or IP address (IPv6 in brackets); an optional
port 1-65535; an optional path; no user name or password, query, fragment, whitespace or other characters.
"""

from __future__ import annotations

import re

MAX_LENGTH = 512
PATTERN = (r"^(https?|grpc)://([A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
           r"(/[-A-Za-z0-9._~%/]*)?$")
_URL = re.compile(PATTERN)
EXAMPLE = "http://collector.observability:4317"


def shown(text: str, limit: int = 80) -> str:
    """`text` for a message: quoted, non-ASCII and control characters escaped, long ones cut."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return ascii(text)


def problem(url: object) -> str | None:
    """Why `url` cannot be a trace's OTLP endpoint, or None if it can."""
    if not isinstance(url, str):
        return f"must be a URL string such as {EXAMPLE}, not {type(url).__name__}"
    if len(url) > MAX_LENGTH:
        return f"is {len(url)} characters long; at most {MAX_LENGTH}"
    m = _URL.fullmatch(url)
    if m is None:
        return (f"{shown(url)} is not an OTLP endpoint such as {EXAMPLE}: use scheme http, https or grpc, an ASCII "
                "host name or IP address, an optional port and path, and no user name, password, query or spaces")
    port = m.group(4)
    if port is not None and not 1 <= int(port[1:]) <= 65535:
        return f"{shown(url)} has port {port[1:]}; a port is 1-65535"
    return None
