# syntax=docker/dockerfile:1
# metaemu container image: a wheel built in one stage, installed into a slim runtime that has no
# compilers or build caches and runs as a fixed non-root user.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY metaemu ./metaemu
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="metaemu" \
      org.opencontainers.image.description="GCE/GKE metadata server for workloads outside Google Cloud, backed by Workload Identity Federation" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 65532 metaemu \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin metaemu
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels metaemu && rm -rf /wheels
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["metaemu"]
CMD ["serve"]
