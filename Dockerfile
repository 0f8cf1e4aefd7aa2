# syntax=docker/dockerfile:1
# metaemu container image. The build stage makes metaemu's wheel; the runtime stage installs the
# pinned, hash-checked dependencies of requirements.lock and the wheel, and keeps no compilers,
# build files or pip caches. Runs as a fixed non-root user and works with a read-only root
# filesystem (nothing is written at run time).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY metaemu ./metaemu
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="metaemu" \
      org.opencontainers.image.description="GCE/GKE metadata server for workloads outside Google Cloud, backed by Workload Identity Federation" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/metaemu/metaemu"
# node-setup (node mode's init/sidecar container) drives iptables, conntrack and ip. Debian's
# security updates replace exact versions, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 metaemu \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin metaemu
COPY requirements.lock /tmp/requirements.lock
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-deps /tmp/wheels/metaemu-*.whl \
 && rm -rf /tmp/wheels /tmp/requirements.lock
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["metaemu"]
CMD ["serve"]
