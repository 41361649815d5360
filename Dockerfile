# hostdev: one image, two entrypoints.
#   hostdev-operator  the kopf operator (Deployment; runs as the image's non-root user)
#   hostdev-node      the node agent (DaemonSet; the chart runs it as uid 0, see docs/security.md)
#   hostdev           the CLI (`hostdev scan` works in either container)
# Build:  docker build -t <registry>/hostdev:0.1.0 .
# The builder's install step is replayed outside Docker by tests/chart/test_image.py.

# Python 3.11 matches the project's floor (pyproject requires-python) and its CI interpreter,
# so the test that replays the install below exercises the same resolution.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: resolve and install hostdev with its dependencies into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# hostdev/deviceplugin and hostdev/operator are symlinks to the top-level folders: copy both.
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/
COPY hostdev/ hostdev/
COPY deviceplugin/ deviceplugin/
COPY operator/ operator/
# Binary wheels only: every dependency (grpcio, protobuf, ...) ships manylinux wheels, so no
# compiler is needed here and nothing is built from an unreviewed sdist.
# Exact versions from requirements/constraints.txt (what CI tested), for the dependencies and
# for the pip, setuptools and wheel that build hostdev; pip first, as older ones lack
# --build-constraint.
# The node agent's start path gets its dataclass methods compiled here, beside the bytecode pip
# compiles (hostdev/deviceplugin/startcache.py).
# -I: /src is the working directory and its operator/ folder would shadow the stdlib module.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -I -m venv /opt/hostdev \
    && /opt/hostdev/bin/pip install --only-binary=:all: -c requirements/constraints.txt pip \
    && /opt/hostdev/bin/pip install --only-binary=:all: -c requirements/constraints.txt \
       --build-constraint requirements/constraints.txt . \
    && /opt/hostdev/bin/python -I -m hostdev.deviceplugin.startcache \
    && /opt/hostdev/bin/pip uninstall --yes setuptools pip

# ---- final: the venv (without pip and setuptools), pci.ids, and nothing to build with ----
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="hostdev" \
      org.opencontainers.image.description="PCI passthrough (VFIO, SR-IOV) for KubeVirt VMs: operator and node agent" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# pci.ids names devices in `hostdev scan` and NodeState status (the agent prefers the host's
# own copy under /host when present). Debian point releases replace package versions, so the
# base image tag, not an apt version pin, is what fixes the content.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends pci.ids \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/hostdev /opt/hostdev
# Non-root user for the operator (uid/gid 65532, matching the chart's runAsUser).
RUN groupadd --system --gid 65532 hostdev \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin hostdev
ENV PATH=/opt/hostdev/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
CMD ["hostdev-operator", "--standalone"]
