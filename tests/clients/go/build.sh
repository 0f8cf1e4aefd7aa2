#!/usr/bin/env bash
# Build the Go metaemu test client in GOPATH mode against the Debian-packaged libraries
# (/usr/share/gocode; no module proxy, no network).
# Usage: tests/clients/go/build.sh OUTPUT_BINARY
# Falls back to -tags noidtoken when google.golang.org/api/idtoken (golang-google-api-dev) does not build.
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 OUTPUT_BINARY" >&2
    exit 2
fi
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$1" in /*) OUT="$1" ;; *) OUT="$PWD/$1" ;; esac
command -v go >/dev/null 2>&1 || { echo "go not found (run scripts/install-clients.sh)" >&2; exit 1; }

export GO111MODULE=off
export GOPATH="${METAEMU_GOPATH:-/usr/share/gocode}"
export GOFLAGS=
export GOPROXY=off
export GOTOOLCHAIN=local
export CGO_ENABLED=0
if [ -z "${GOCACHE:-}" ]; then
    GOCACHE="$(mktemp -d)"
    trap 'rm -rf "$GOCACHE"' EXIT
    export GOCACHE
fi

mkdir -p "$(dirname "$OUT")"
cd "$SRC"
if go build -o "$OUT" . ; then
    echo "built $OUT (with google.golang.org/api/idtoken)" >&2
else
    echo "full build failed; retrying without google.golang.org/api/idtoken (-tags noidtoken)" >&2
    go build -tags noidtoken -o "$OUT" .
    echo "built $OUT (without idtoken)" >&2
fi
