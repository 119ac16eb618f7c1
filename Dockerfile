# One image for every service binary of the workspace.
#
#   docker build -t mlplatform:latest .
#   docker run --rm mlplatform:latest registry --help
#
# There is deliberately no ENTRYPOINT: docker-compose.yml picks the binary per
# service with `command:` (trainer, registry, predictor, monitor or mlctl).

# ---------------------------------------------------------------------------
# Builder: compile all binaries of the workspace in release mode.
# ---------------------------------------------------------------------------
FROM rust:1-bookworm AS builder

WORKDIR /build

# The whole context (minus .dockerignore) is copied: simple and always correct
# whatever the workspace members are. Cargo.lock is part of it and --locked
# makes the build fail rather than silently resolve new versions.
COPY . .

RUN cargo build --release --locked --bins \
 && mkdir -p /out \
 && for bin in trainer registry predictor monitor mlctl gateway; do \
        install -m 0755 "target/release/${bin}" "/out/${bin}"; \
    done

# ---------------------------------------------------------------------------
# Runtime: a slim Debian with the binaries and the sample data.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Non-root user. /var/lib/registry is created and owned by that user here so a
# fresh named volume mounted there inherits the ownership and the registry can
# write its store.
ARG APP_UID=10001
ARG APP_GID=10001
RUN groupadd --gid "${APP_GID}" mlplatform \
 && useradd --uid "${APP_UID}" --gid mlplatform \
        --home-dir /app --no-create-home --shell /usr/sbin/nologin mlplatform \
 && mkdir -p /app /var/lib/registry \
 && chown mlplatform:mlplatform /var/lib/registry

COPY --from=builder /out/ /usr/local/bin/
COPY data/ /app/data/
# Files keep their build-context modes: make sure the non-root user can read
# the data even when the host copy was 0600.
RUN chmod -R a+rX /app/data

WORKDIR /app
USER mlplatform:mlplatform

# Image-level defaults; compose sets these (and NATS_URL) explicitly anyway.
# No VOLUME instruction: it would give every container of the image (trainer,
# each predictor replica, ...) an anonymous volume; compose mounts the named
# `registry-data` volume on the registry service only.
ENV REGISTRY_DIR=/var/lib/registry \
    DATA_PATH=/app/data/user_data.csv
