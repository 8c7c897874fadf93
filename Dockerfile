# Two images from one Dockerfile:
#   docker build --target operator -t latencytrace-operator .
#   docker build --target agent    -t latencytrace-agent .
# Both install the locked dependencies with uv into /app/.venv from Debian's Python 3.11.

FROM ghcr.io/astral-sh/uv:0.8 AS uv

FROM debian:bookworm-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /app
# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --python /usr/bin/python3
COPY bpf/ bpf/
COPY node_agent/ node_agent/
COPY operator/ operator/
RUN uv sync --frozen --no-dev --no-editable --python /usr/bin/python3 \
 && rm -rf /root/.cache
ENV PATH=/app/.venv/bin:$PATH

# The operator: no kernel access, runs as an unprivileged user (the chart also drops every capability
# and mounts the root filesystem read-only).
FROM base AS operator
USER 65532:65532
ENTRYPOINT ["latencytrace-operator"]

# The node agent: BCC from Debian (python3-bpfcc, linked into the venv), a kernel header tree for BCC to
# compile against (offsets come from BTF, so any tree works: kernel/headers.py links it into
# /lib/modules/$(uname -r) at start), bpftool for debugging, iproute2 for `ip netns`.
FROM base AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-bpfcc bpftool linux-headers-amd64 iproute2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/lib/python3/dist-packages/bcc /app/.venv/lib/python3.11/site-packages/bcc
ENTRYPOINT ["latencytrace-agent"]
CMD ["run"]
