#!/usr/bin/env bash
# Build the Go metaemu test client from this directory's one source, in one of two flavours:
#   debian   GOPATH mode against the Debian-packaged libraries (/usr/share/gocode; no module proxy)
#   current  module mode against the current libraries pinned by go.mod + go.sum (module proxy on
#            first use, the module cache afterwards)
# Usage: tests/clients/go/build.sh {debian|current} OUTPUT_BINARY
# The debian flavour falls back to -tags noidtoken when google.golang.org/api/idtoken
# (golang-google-api-dev) does not build; the current one never does.
set -euo pipefail
if [ $# -ne 2 ] || { [ "$1" != debian ] && [ "$1" != current ]; }; then
    echo "usage: $0 {debian|current} OUTPUT_BINARY" >&2
    exit 2
fi
FLAVOUR="$1"
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$2" in /*) OUT="$2" ;; *) OUT="$PWD/$2" ;; esac
# The machine's Go 1.26 first: an apt-installed Go must not shadow it.
if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; fi
command -v go >/dev/null 2>&1 || { echo "go not found (expected Go 1.26 at /usr/local/go)" >&2; exit 1; }

export GOTOOLCHAIN=local
export CGO_ENABLED=0
if [ -z "${GOCACHE:-}" ]; then
    GOCACHE="$(mktemp -d)"
    trap 'rm -rf "$GOCACHE"' EXIT
    export GOCACHE
fi
mkdir -p "$(dirname "$OUT")"
cd "$SRC"

if [ "$FLAVOUR" = current ]; then
    export GO111MODULE=on GOFLAGS=-mod=readonly
    go build -o "$OUT" .
    echo "built $OUT (current: $(awk '/compute\/metadata |x\/oauth2 |google.golang.org\/api / {printf "%s %s; ", $1, $2}' go.mod))" >&2
    exit 0
fi

export GO111MODULE=off
export GOPATH="${METAEMU_GOPATH:-/usr/share/gocode}"
export GOFLAGS=
export GOPROXY=off
if go build -o "$OUT" . ; then
    echo "built $OUT (debian, with google.golang.org/api/idtoken)" >&2
else
    echo "full build failed; retrying without google.golang.org/api/idtoken (-tags noidtoken)" >&2
    go build -tags noidtoken -o "$OUT" .
    echo "built $OUT (debian, without idtoken)" >&2
fi
