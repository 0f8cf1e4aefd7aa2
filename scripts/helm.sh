#!/usr/bin/env bash
# Build Helm (helm.sh/helm/v4) from its published source through the Go module proxy: the judge of
# charts/metaemu (tests/test_helm_chart.py). scripts/helm/go.mod pins the version; go.sum checks it.
# Cached outside the repository, keyed by version: only the first run on a machine pays for the build.
#
# Usage:
#   scripts/helm.sh              build if needed; print progress on stderr
#   scripts/helm.sh --print-dir  build if needed; print the directory holding the helm binary
#
# Environment:
#   METAEMU_CACHE_DIR  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/metaemu)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE_DIR="$ROOT/scripts/helm"

log() { printf '[helm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

print_dir=0
case "${1:-}" in
    "") ;;
    --print-dir) print_dir=1 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument ${1} (usage: $0 [--print-dir])" ;;
esac

if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; fi
command -v go >/dev/null 2>&1 || die "go not found: building helm needs Go 1.26 (see README, Development)"

# The version comes from go.mod, so the cache key cannot drift from what is built.
VERSION="$(awk '$1 == "require" && $2 == "helm.sh/helm/v4" {print $3; exit} $1 == "helm.sh/helm/v4" && $2 ~ /^v/ {print $2; exit}' "$MODULE_DIR/go.mod")"
[ -n "$VERSION" ] || die "helm.sh/helm/v4 is not required in $MODULE_DIR/go.mod"
CACHE_ROOT="${METAEMU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/metaemu}"
DIR="$CACHE_ROOT/helm-$VERSION"

if [ -x "$DIR/helm" ]; then
    log "cached: helm $VERSION in $DIR"
else
    log "building helm $VERSION with $(go version | awk '{print $3}') (first run on this machine: downloads its modules and compiles)"
    mkdir -p "$CACHE_ROOT"
    staging="$(mktemp -d "$CACHE_ROOT/.build-helm-XXXXXX")"
    trap 'rm -rf "$staging"' EXIT
    export GOFLAGS=-mod=readonly GOTOOLCHAIN=local CGO_ENABLED=0
    t0=$SECONDS
    (cd "$MODULE_DIR" && go mod download) || die "go mod download failed in $MODULE_DIR"
    log "modules ready in $((SECONDS - t0)) s; compiling (one line per 100 packages)"
    t1=$SECONDS
    # Stamp the version as Helm's Makefile does (internal/version), so `helm version` tells the truth.
    ldflags="-X helm.sh/helm/v4/internal/version.version=$VERSION"
    if ! (cd "$MODULE_DIR" && go build -v -trimpath -ldflags="$ldflags" -o "$staging/helm" helm.sh/helm/v4/cmd/helm \
            2>&1 | awk '{n++; if (n % 100 == 0) printf "[helm] compiled %d packages (%s)\n", n, $0 > "/dev/stderr"; else if ($0 ~ /^(#|.*\.go:[0-9]+)/) print > "/dev/stderr"} END {exit 0}'; exit "${PIPESTATUS[0]}"); then
        die "go build failed (see the compiler output above)"
    fi
    [ -x "$staging/helm" ] || die "build produced no helm"
    mkdir -p "$DIR"
    mv "$staging/helm" "$DIR/helm"
    log "built in $((SECONDS - t1)) s compile + $((t1 - t0)) s download: $DIR/helm"
fi

"$DIR/helm" version >/dev/null 2>&1 || die "$DIR/helm does not run"
if [ "$print_dir" = 1 ]; then printf '%s\n' "$DIR"; fi
