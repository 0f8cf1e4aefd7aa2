#!/usr/bin/env bash
# Install the real Google client libraries that metaemu's client acceptance tests drive
# (see shared/spec/clients.md):
#   * Go, built with the machine's Go 1.26: Debian's packaged libraries (GOPATH mode) and the current
#     releases pinned by tests/clients/go/go.mod (module proxy, cached):
#       cloud.google.com/go/compute/metadata, golang.org/x/oauth2/google, google.golang.org/api/idtoken
#   * Node: gcp-metadata + google-auth-library, pinned by tests/clients/node/package-lock.json
#   * Java: google-auth-library-oauth2-http, current (tests/clients/java/current/pom.xml) and Debian's 0.18
#   * docker compose, built with the same Go from scripts/compose/go.mod (the compose-file tests' judge)
# gcloud is not installable from the registries we can reach; the tests use it only when it is on PATH.
#
# Idempotent and non-interactive; a no-op (well under a second) when everything is already installed.
# Must run as root (or with passwordless sudo) on Debian 12 for the apt part.
#
# Environment:
#   SKIP_GO=1    do not install the Debian Go library packages or build docker compose
#   SKIP_NODE=1  do not run npm ci
#   SKIP_JAVA=1  do not install the JDK, Maven, Debian's libgoogle-auth-java or the pinned current release
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_DIR="$ROOT/tests/clients/node"
# wrk is the load generator of benchmarks/run.py (its smoke test runs in make test).
# prometheus provides promtool (alert unit tests); docker-compose 1.29 (and the docker compose built
# below) validate docker-compose.yml offline.
APT_PACKAGES=(golang-golang-x-oauth2-google-dev golang-google-api-dev wrk prometheus docker-compose iptables conntrack)

log() { printf '[install-clients] %s\n' "$*"; }

export DEBIAN_FRONTEND=noninteractive

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); fi
fi

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

# apt_install WHAT PACKAGE...: install with apt-get, running apt-get update once if that fails.
apt_install() {
    local what="$1"
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        log "$what: apt-get not available; cannot install $*" >&2
        return 1
    fi
    log "$what: installing $* with apt-get"
    local t0=$SECONDS
    if ! "${SUDO[@]}" apt-get install -y --no-install-recommends "$@"; then
        log "$what: apt-get install failed; running apt-get update and retrying"
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" apt-get install -y --no-install-recommends "$@"
    fi
    log "$what: installed in $((SECONDS - t0)) s"
}

install_go() {
    # The machine's own Go (/usr/local/go, Go 1.26) builds the Go client and the Kubernetes test bed;
    # Debian's golang-go is never installed, so it cannot shadow it. The -dev library packages below
    # depend on no toolchain.
    if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; fi
    if ! command -v go >/dev/null 2>&1; then
        log "go: no Go toolchain (expected Go 1.26 at /usr/local/go; see README, Quickstart)" >&2
        return 1
    fi
    local missing=()
    local p
    for p in "${APT_PACKAGES[@]}"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then apt_install go "${missing[@]}"; fi
    # The current libraries of the same client, pinned by its go.mod + go.sum: into the module
    # cache now, so the test builds without the network (a no-op once cached).
    (cd "$ROOT/tests/clients/go" && GOFLAGS=-mod=readonly GOTOOLCHAIN=local go mod download)
    log "go: $(go version | awk '{print $3}') at $(command -v go); Debian Go libraries and tests/clients/go/go.mod modules present"
}

# Java: google-auth-library-java in two flavours (tests/clients/java_harness.py, clients.md §8.2):
#   * Debian's libgoogle-auth-java 0.18 (jars under /usr/share/java), plus a JDK and Maven, via apt-get;
#   * the current release pinned in tests/clients/java/current/pom.xml, copied with its runtime dependencies
#     from Maven Central (local repository ~/.m2) into tests/clients/java/current/build/lib (git-ignored),
#     so the tests need no network. build/lib/.installed newer than pom.xml means it is up to date.
# SKIP_JAVA=1 skips all of it.
install_java() {
    local pom_dir="$ROOT/tests/clients/java/current"
    local lib="$pom_dir/build/lib"
    local stamp="$lib/.installed"
    local missing=()
    command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
    command -v mvn >/dev/null 2>&1 || missing+=(maven)
    pkg_installed libgoogle-auth-java || missing+=(libgoogle-auth-java)
    if [ "${#missing[@]}" -gt 0 ]; then apt_install java "${missing[@]}"; fi
    if [ -f "$stamp" ] && [ "$stamp" -nt "$pom_dir/pom.xml" ]; then
        log "java: libgoogle-auth-java present; $lib up to date with pom.xml"
        return 0
    fi
    log "java: mvn dependency:copy-dependencies in $pom_dir"
    local t1=$SECONDS
    rm -rf "$lib"  # no jars of an older pin left behind
    (cd "$pom_dir" && mvn -q -B dependency:copy-dependencies)
    touch "$stamp"
    local jars=("$lib"/*.jar)
    log "java: current library copied in $((SECONDS - t1)) s (${#jars[@]} jars)"
}

# docker compose (the CLI users run as `docker compose`), built from its published source at the
# version scripts/compose/go.mod pins, cached per machine: Debian ships only docker-compose 1.29,
# whose interpolation is not today's. The compose tests render docker-compose.yml with both.
install_compose() {
    if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; fi
    local version
    version=$(awk '$1 == "github.com/docker/compose/v5" {print $2}' "$ROOT/scripts/compose/go.mod")
    local out="$HOME/.cache/metaemu/docker-compose-$version/docker-compose"
    if [ -x "$out" ]; then
        log "compose: docker compose $version cached at $out"
        return 0
    fi
    log "compose: building docker compose $version from the module proxy (about a minute the first time)"
    local t0=$SECONDS
    mkdir -p "$(dirname "$out")"
    (cd "$ROOT/scripts/compose" && GOFLAGS=-mod=readonly GOTOOLCHAIN=local \
        go build -trimpath -ldflags "-w -X github.com/docker/compose/v5/internal.Version=$version" \
        -o "$out.tmp" github.com/docker/compose/v5/cmd)  # the flags of compose's own Makefile
    mv "$out.tmp" "$out"
    log "compose: built in $((SECONDS - t0)) s: $out"
}

install_node() {
    if ! command -v npm >/dev/null 2>&1; then
        log "node: npm not found; skipping the Node client (tests that need it will skip)" >&2
        return 0
    fi
    if [ ! -f "$NODE_DIR/package-lock.json" ]; then
        log "node: $NODE_DIR/package-lock.json missing" >&2
        return 1
    fi
    # npm ci writes node_modules/.package-lock.json; if it is newer than the lock and package.json,
    # node_modules matches the lock.
    local hidden="$NODE_DIR/node_modules/.package-lock.json"
    if [ -f "$hidden" ] && [ "$hidden" -nt "$NODE_DIR/package-lock.json" ] \
        && [ "$hidden" -nt "$NODE_DIR/package.json" ] \
        && [ -f "$NODE_DIR/node_modules/google-auth-library/package.json" ] \
        && [ -f "$NODE_DIR/node_modules/gcp-metadata/package.json" ]; then
        log "node: node_modules up to date with package-lock.json"
        return 0
    fi
    log "node: npm ci in $NODE_DIR"
    local t0=$SECONDS
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    # npm ci does not always bump the hidden lockfile's mtime past package-lock.json; make it so.
    touch "$hidden"
    log "node: installed in $((SECONDS - t0)) s"
}

if [ "${SKIP_GO:-0}" != "1" ]; then install_go; else log "go: skipped (SKIP_GO=1)"; fi
if [ "${SKIP_GO:-0}" != "1" ]; then install_compose; else log "compose: skipped (SKIP_GO=1)"; fi
if [ "${SKIP_NODE:-0}" != "1" ]; then install_node; else log "node: skipped (SKIP_NODE=1)"; fi
if [ "${SKIP_JAVA:-0}" != "1" ]; then install_java; else log "java: skipped (SKIP_JAVA=1)"; fi
if command -v gcloud >/dev/null 2>&1; then
    log "gcloud: found at $(command -v gcloud) (preinstalled; not managed by this script)"
else
    log "gcloud: not on PATH (not installable from the reachable registries); gcloud checks will skip"
fi
log "done"
