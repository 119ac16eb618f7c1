# One image for every service binary of the workspace.
#
#   docker build -t mlplatform:latest .
#   docker run --rm mlplatform:latest registry --help
#
# There is deliberately no ENTRYPOINT: docker-compose.yml picks the binary per
# service with `command:` (trainer, registry, predictor, monitor or mlctl).
#
# Layer caching, with BuildKit and with the legacy builder (docker-compose
# 1.29 uses the latter): the dependencies are compiled in a layer of their
# own, from the manifests, Cargo.lock and a stub for each target, so a change
# to the project's code recompiles only the workspace's crates. .dockerignore
# keeps everything but the sources, manifests and data out of the context.

# ---------------------------------------------------------------------------
# Planner: the dependency skeleton (every Cargo.toml, Cargo.lock, a stub for
# every target). It reruns whenever the context changes; the builder's
# `COPY --from=planner` is a cache hit as long as the skeleton's content is
# the same, i.e. until a manifest or the lock file changes.
# ---------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS planner

WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir -p /skeleton; \
    cp Cargo.toml Cargo.lock /skeleton/; \
    for manifest in $(find . -mindepth 2 -name Cargo.toml | sort); do \
        crate=$(dirname "${manifest}"); \
        mkdir -p "/skeleton/${crate}/src"; \
        cp "${manifest}" "/skeleton/${manifest}"; \
        if [ -f "${crate}/src/lib.rs" ] || [ ! -f "${crate}/src/main.rs" ]; then \
            echo '//! Stub of the dependency layer.' > "/skeleton/${crate}/src/lib.rs"; \
        fi; \
        for target in "${crate}/src/main.rs" "${crate}"/src/bin/*.rs "${crate}"/benches/*.rs \
                      "${crate}"/examples/*.rs "${crate}"/tests/*.rs; do \
            if [ -f "${target}" ]; then \
                mkdir -p "/skeleton/$(dirname "${target}")"; \
                printf '//! Stub of the dependency layer.\nfn main() {}\n' > "/skeleton/${target}"; \
            fi; \
        done; \
    done

# ---------------------------------------------------------------------------
# Builder: the dependencies from the skeleton, then the workspace's binaries
# with the `dist` profile (release, no debug information, stripped).
# ---------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder

WORKDIR /build
COPY --from=planner /skeleton/ ./
# Cargo.lock is part of the skeleton and --locked makes the build fail rather
# than silently resolve new versions.
RUN cargo build --profile dist --locked --workspace --bins

COPY . .
# The stubs were built later than the real sources' modification times:
# touch the sources so that cargo rebuilds the workspace's crates from them.
# Every binary of the workspace goes to the image (a new service crate needs
# no change here).
RUN find . -path ./target -prune -o -name '*.rs' -exec touch {} + \
 && cargo build --profile dist --locked --workspace --bins \
 && mkdir -p /out \
 && find target/dist -maxdepth 1 -type f -perm -u+x -exec install -m 0755 -t /out {} +

# ---------------------------------------------------------------------------
# Runtime: a slim Debian with the binaries and the sample data.
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# CA certificates (for NATS over TLS with the system's roots) from the
# builder, which has Debian's ca-certificates: no package download here.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt

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

COPY data/ /app/data/
# Files keep their build-context modes: make sure the non-root user can read
# the data even when the host copy was 0600.
RUN chmod -R a+rX /app/data
COPY --from=builder /out/ /usr/local/bin/

WORKDIR /app
USER mlplatform:mlplatform

# Image-level defaults; compose sets these (and NATS_URL) explicitly anyway.
# No VOLUME instruction: it would give every container of the image (trainer,
# each predictor replica, ...) an anonymous volume; compose mounts the named
# `registry-data` volume on the registry service only.
ENV REGISTRY_DIR=/var/lib/registry \
    DATA_PATH=/app/data/user_data.csv
