# Two images from one Dockerfile (BuildKit, or buildah: see .ci/images, which builds both without a daemon):
#   docker build --target operator -t ghcr.io/latencytrace/latencytrace-operator:0.1.0 .
#   docker build --target agent    -t ghcr.io/latencytrace/latencytrace-agent:0.1.0 .
# Each runtime image is Debian's Python 3.11 plus one virtual environment (/app/.venv) holding only its
# component's locked dependencies, built in a separate stage: no uv, compiler or package lists in either.
# Optional: --build-arg VERSION=... --build-arg REVISION=$(git rev-parse HEAD) for the OCI labels.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# The Python runtime both images start from. Package downloads and lists live in cache mounts, not layers.
FROM debian:bookworm-slim AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN --mount=type=cache,target=/var/cache/apt \
    --mount=type=cache,target=/var/lib/apt/lists \
    rm -f /etc/apt/apt.conf.d/docker-clean \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old

# Virtual environments are built here with uv, one stage per component, at the path they run from.
FROM python AS venv
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/bin/python3 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
COPY pyproject.toml uv.lock ./

# Dependencies first (cached while only the code changes), then the project itself. Byte-compiled, so
# that nothing is compiled at each start on a read-only root, except the kubernetes package: its
# generated client is mostly docstrings, 25 MB as bytecode for about a second at start. Its asyncio copy
# of the client (kubernetes.aio, half of the package) is used by nothing here.
FROM venv AS operator-venv
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --extra operator \
 && rm -rf /app/.venv/lib/python3.11/site-packages/kubernetes/aio
COPY README.md ./
COPY bpf/ bpf/
COPY node_agent/ node_agent/
COPY operator/ operator/
# --reinstall-package: uv's cache (shared by every build on the machine) keys a built project wheel on
# pyproject.toml only, and would install an older build of these sources.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --reinstall-package latencytrace --extra operator \
 && find /app/.venv/lib/python3.11/site-packages/kubernetes -name __pycache__ -prune -exec rm -rf {} +

FROM venv AS agent-venv
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --extra agent \
 && rm -rf /app/.venv/lib/python3.11/site-packages/kubernetes/aio
COPY README.md ./
COPY bpf/ bpf/
COPY node_agent/ node_agent/
COPY operator/ operator/
# BCC's Python module is Debian's (python3-bpfcc in the agent image; the PyPI package named bcc is
# unrelated): linked into the environment.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --reinstall-package latencytrace --extra agent \
 && find /app/.venv/lib/python3.11/site-packages/kubernetes -name __pycache__ -prune -exec rm -rf {} + \
 && ln -s /usr/lib/python3/dist-packages/bcc /app/.venv/lib/python3.11/site-packages/bcc

# A kernel header tree for BCC to compile against (offsets come from BTF, so any tree works:
# kernel/headers.py links it into /lib/modules/$(uname -r) at start). Unpacked from Debian's packages
# rather than installed, since linux-headers-amd64 depends on gcc; other architectures' headers and the
# graphics, sound, media and device-tree ones dropped (BCC's helpers and our probes include none of them).
FROM python AS headers
RUN --mount=type=cache,target=/var/cache/apt \
    --mount=type=cache,target=/var/lib/apt/lists \
    apt-get update \
 && arch=$(apt-cache depends linux-headers-amd64 | awk '/Depends: linux-headers-/ {print $2; exit}') \
 && common=$(apt-cache depends "$arch" | awk '/Depends: linux-headers-.*-common/ {print $2; exit}') \
 && mkdir /tmp/debs && cd /tmp/debs && apt-get download "$arch" "$common" \
 && mkdir /headers && for deb in *.deb; do dpkg-deb -x "$deb" /headers; done \
 && find /headers/usr/src/linux-headers-*-common/arch -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} + \
 && cd /headers/usr/src/linux-headers-*-common/include && rm -rf drm dt-bindings media sound \
 && rm -rf /headers/usr/share /tmp/debs

# The operator: no kernel access, only the operator's dependencies; runs as an unprivileged user and
# writes nothing (the chart drops every capability and mounts the root filesystem read-only).
FROM python AS operator
COPY --from=operator-venv /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH
USER 65532:65532
ENTRYPOINT ["latencytrace-operator"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="latencytrace-operator" \
      org.opencontainers.image.description="latencytrace operator: turns LatencyTraces into per-node configuration for the node agents" \
      org.opencontainers.image.source="https://github.com/latencytrace/latencytrace" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION"

# The node agent: BCC from Debian (its LLVM is what compiles the probes) and the header tree.
FROM python AS agent
RUN --mount=type=cache,target=/var/cache/apt \
    --mount=type=cache,target=/var/lib/apt/lists \
    apt-get update \
 && apt-get install -y --no-install-recommends python3-bpfcc \
 && rm -rf /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old
COPY --from=headers /headers/usr/src/ /usr/src/
COPY --from=agent-venv /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH
ENTRYPOINT ["latencytrace-agent"]
CMD ["run"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="latencytrace-agent" \
      org.opencontainers.image.description="latencytrace node agent: per-pod, per-segment network stack latency from eBPF, exported over OTLP" \
      org.opencontainers.image.source="https://github.com/latencytrace/latencytrace" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION"
