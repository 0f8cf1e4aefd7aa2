#!/usr/bin/env bash
# Build the real Kubernetes control plane of metaemu's test bed: kube-apiserver and kubectl from the
# k8s.io/kubernetes module, and the etcd server that release is tested with, all from their published
# sources through the Go module proxy (scripts/kube-testenv/go.mod pins them; go.sum checks them).
#
# The binaries are cached outside the repository, keyed by version, so only the first run on a machine
# pays for the build (about 7 minutes on 2 cores); later runs are a no-op.
#
# Usage:
#   scripts/kube-testenv.sh              build if needed; print progress on stderr
#   scripts/kube-testenv.sh --print-dir  build if needed; print the directory holding the binaries
#
# Environment:
#   METAEMU_CACHE_DIR  cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/metaemu)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODULE_DIR="$ROOT/scripts/kube-testenv"

log() { printf '[kube-testenv] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

print_dir=0
case "${1:-}" in
    "") ;;
    --print-dir) print_dir=1 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument ${1} (usage: $0 [--print-dir])" ;;
esac

# The machine's own Go (/usr/local/go) first: an apt-installed Go must not shadow it.
if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; fi
command -v go >/dev/null 2>&1 || die "go not found: the test bed needs Go 1.26 (see README, Development)"

# Versions come from go.mod, so the cache key cannot drift from what is built.
mod_version() {
    local v
    v="$(awk -v m="$1" '$1 == m && $2 ~ /^v/ {print $2; exit}' "$MODULE_DIR/go.mod")"
    [ -n "$v" ] || die "$1 is not required in $MODULE_DIR/go.mod"
    printf '%s' "$v"
}
KUBE_VERSION="$(mod_version k8s.io/kubernetes)"
ETCD_VERSION="$(mod_version go.etcd.io/etcd/server/v3)"
CACHE_ROOT="${METAEMU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/metaemu}"
DIR="$CACHE_ROOT/kube-$KUBE_VERSION-etcd-$ETCD_VERSION"
BINARIES=(kube-apiserver kubectl etcd)

built() {
    local b
    for b in "${BINARIES[@]}"; do [ -x "$DIR/$b" ] || return 1; done
}

if built; then
    log "cached: kube-apiserver/kubectl $KUBE_VERSION, etcd $ETCD_VERSION in $DIR"
else
    log "building kube-apiserver/kubectl $KUBE_VERSION and etcd $ETCD_VERSION with $(go version | awk '{print $3}')"
    log "first run on this machine: downloads ~300 MB of modules and compiles (about 7 min on 2 cores)"
    mkdir -p "$CACHE_ROOT"
    staging="$(mktemp -d "$CACHE_ROOT/.build-XXXXXX")"
    trap 'rm -rf "$staging"' EXIT
    export GOFLAGS=-mod=readonly GOTOOLCHAIN=local CGO_ENABLED=0
    t0=$SECONDS
    (cd "$MODULE_DIR" && go mod download -x 2>&1 | awk '/^# get .*: 200 OK/ {n++; if (n % 50 == 0) printf "[kube-testenv] downloaded %d modules\n", n > "/dev/stderr"}') \
        || die "go mod download failed in $MODULE_DIR"
    log "modules ready in $((SECONDS - t0)) s; compiling (one package line per 200 compiled)"
    t1=$SECONDS
    # Stamp the release into the binaries as the Kubernetes build does (hack/lib/version.sh), so
    # /version and kubectl's skew check see v1.X.Y instead of v0.0.0-master.
    minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
    ldflags=""
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean"
    done
    # -v names each package as it is compiled: a progress line per 200 of them keeps CI logs alive.
    if ! (cd "$MODULE_DIR" && go build -v -ldflags="$ldflags" -o "$staging/" \
            go.etcd.io/etcd/server/v3 k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl \
            2>&1 | awk '{n++; if (n % 200 == 0) printf "[kube-testenv] compiled %d packages (%s)\n", n, $0 > "/dev/stderr"; else if ($0 ~ /^(#|.*\.go:[0-9]+)/) print > "/dev/stderr"} END {exit 0}'; exit "${PIPESTATUS[0]}"); then
        die "go build failed (see the compiler output above)"
    fi
    # The etcd server's main package is go.etcd.io/etcd/server/v3, so go build names its binary "server".
    mv "$staging/server" "$staging/etcd"
    for b in "${BINARIES[@]}"; do [ -x "$staging/$b" ] || die "build produced no $b"; done
    mkdir -p "$DIR"
    for b in "${BINARIES[@]}"; do mv "$staging/$b" "$DIR/$b"; done
    log "built in $((SECONDS - t1)) s compile + $((t1 - t0)) s download: $DIR"
fi

"$DIR/kube-apiserver" --version >/dev/null 2>&1 || die "$DIR/kube-apiserver does not run"
if [ "$print_dir" = 1 ]; then printf '%s\n' "$DIR"; fi
