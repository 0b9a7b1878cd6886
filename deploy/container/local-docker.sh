#!/usr/bin/env bash
# Build and run the serving image on a machine with no container registry and no Docker service:
# a private dockerd (no bridge, no iptables, its own data-root, exec-root and socket under a cache
# dir), a Debian base image made with debootstrap + `docker import`, and the wheels the Dockerfile
# installs served from a `pip download` directory over a loopback index. The unchanged Dockerfile
# is built with `--network host` and the base image and index passed as build args.
#
#   deploy/container/local-docker.sh install        apt-get install docker.io debootstrap (root)
#   deploy/container/local-docker.sh start          start the private dockerd (no-op if it runs)
#   deploy/container/local-docker.sh build [TAG]    base image + wheels + docker build (TAG:
#                                                   adaptive-inference:local)
#   deploy/container/local-docker.sh stop           stop the private dockerd (and its containers)
#   deploy/container/local-docker.sh env            print the DOCKER_HOST line for a shell
#
# Everything lives under $ADAPTIVE_CONTAINER_CACHE (default ~/.cache/adaptive-inference/container):
# the daemon's images and build cache, the base rootfs tarball and the wheels survive between runs.
# Traffic stays on 127.0.0.1 except apt/debootstrap (the Debian mirror) and pip (the package index).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ADAPTIVE_CONTAINER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adaptive-inference/container}"
SOCK="$CACHE/docker.sock"
PIDFILE="$CACHE/dockerd.pid"
# Debian's docker.io client: a newer static `docker` earlier on PATH may want BuildKit/buildx,
# which this daemon (20.10, legacy builder) does not have.
DOCKER_BIN="${DOCKER_BIN:-$(command -v /usr/bin/docker || command -v docker || true)}"
BASE_IMAGE="${BASE_IMAGE:-adaptive-inference-base:bookworm}"
# The mirror apt already uses (the first deb.debian.org-style URI), so CI needs no other host.
MIRROR="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(\S*\/debian\)$/\1/p' \
    /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

log() { printf '[local-docker] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
docker_() { DOCKER_HOST="unix://$SOCK" "$DOCKER_BIN" "$@"; }
alive() { [ -S "$SOCK" ] && docker_ version >/dev/null 2>&1; }

cmd_install() {
    if command -v dockerd >/dev/null && command -v debootstrap >/dev/null \
            && [ -x /usr/bin/docker ]; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "run as root to apt-get install docker.io debootstrap"
    # No service manager here (and none wanted): policy-rc.d keeps the package scripts from
    # starting the system daemon; this script starts its own.
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        docker.io debootstrap >/dev/null; } || rc=$?
    [ "$created" = 1 ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install docker.io debootstrap failed (exit $rc)"
}

cmd_start() {
    command -v dockerd >/dev/null || die "no dockerd: run '$0 install' (make container-deps)"
    if alive; then
        echo "running"
        return 0
    fi
    mkdir -p "$CACHE/data" "$CACHE/exec"
    rm -f "$SOCK"
    log "starting dockerd (data under $CACHE)"
    # setsid: its own session, so a test runner's process-group signals do not reach it and
    # `stop` decides when it ends.
    setsid dockerd --bridge=none --iptables=false \
        --data-root "$CACHE/data" --exec-root "$CACHE/exec" --pidfile "$PIDFILE" \
        -H "unix://$SOCK" >"$CACHE/dockerd.log" 2>&1 </dev/null &
    local pid=$!
    for _ in $(seq 1 120); do
        if alive; then
            echo "started"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || { tail -n 30 "$CACHE/dockerd.log" >&2; die "dockerd exited"; }
        sleep 0.5
    done
    tail -n 30 "$CACHE/dockerd.log" >&2
    kill "$pid" 2>/dev/null || true
    die "dockerd did not answer on $SOCK within 60 s"
}

cmd_stop() {
    [ -f "$PIDFILE" ] || { rm -f "$SOCK"; return 0; }
    local pid
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd ($pid)"
        kill -TERM "$pid"
        # dockerd stops its containers (10 s each at most) and its containerd first
        for _ in $(seq 1 120); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "dockerd still up after 60 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE" "$SOCK"
    # dockerd leaves its network namespace handle (exec-root/netns/default) mounted: unmount what
    # is left under the exec-root, so the cache dir can be deleted and restarts do not stack.
    local mnt
    awk -v root="$CACHE/exec/" 'index($2, root) == 1 {print $2}' /proc/self/mounts | sort -r |
        while read -r mnt; do umount "$mnt" 2>/dev/null || log "could not unmount $mnt"; done
}

# The base image: Debian bookworm minbase with python3 and venv (Python 3.11, as the Dockerfile's
# default python:3.11-slim). The rootfs tarball is cached, so a fresh data-root re-imports in
# seconds instead of re-running debootstrap (~90 s).
cmd_base() {
    if docker_ image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    local tarball="$CACHE/base/bookworm-minbase.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || die "no debootstrap: run '$0 install'"
        mkdir -p "$CACHE/base"
        local rootfs
        rootfs="$(mktemp -d "$CACHE/base/rootfs.XXXXXX")"
        log "debootstrap bookworm from $MIRROR"
        if ! debootstrap --variant=minbase \
                --include=python3,python3-venv,python-is-python3,ca-certificates \
                bookworm "$rootfs" "$MIRROR" >"$CACHE/base/debootstrap.log" 2>&1; then
            tail -n 30 "$CACHE/base/debootstrap.log" >&2
            rm -rf "$rootfs"
            die "debootstrap failed (log: $CACHE/base/debootstrap.log)"
        fi
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" --numeric-owner -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$rootfs"
    fi
    log "docker import $tarball as $BASE_IMAGE"
    docker_ import --change 'CMD ["python3"]' "$tarball" "$BASE_IMAGE" >/dev/null
}

# The wheels `pip install .` needs inside the image (runtime dependencies from pyproject.toml and
# the build backend), laid out as a PEP 503 simple index: index/simple/<project>/<wheel files>.
# http.server's directory listings are valid index pages. Wheels only, for the base image's
# CPython 3.11 on glibc x86_64.
cmd_wheels() {
    [ -x "$PYTHON" ] || die "no $PYTHON: run 'make setup' first (or set PYTHON)"
    mkdir -p "$CACHE/wheels"
    local reqs
    reqs="$("$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join([*project["build-system"]["requires"], "wheel", *project["project"]["dependencies"]]))
EOF
)"
    log "pip download into $CACHE/wheels"
    printf '%s\n' "$reqs" >"$CACHE/requirements.txt"
    # pip does not widen --platform to older glibc tags itself: name every one bookworm's glibc
    # (2.36) runs, so the wheels fit the image whatever Python makes the download.
    local platforms=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64
                     --platform manylinux1_x86_64) minor
    for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
    "$PYTHON" -m pip download -q --disable-pip-version-check --dest "$CACHE/wheels" \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 \
        --abi none "${platforms[@]}" -r "$CACHE/requirements.txt"
    rm -rf "$CACHE/index"
    local whl name
    for whl in "$CACHE"/wheels/*.whl; do
        name="$(basename "$whl" | cut -d- -f1 | tr 'A-Z_' 'a-z-')"
        mkdir -p "$CACHE/index/simple/$name"
        ln -f "$whl" "$CACHE/index/simple/$name/" 2>/dev/null || cp "$whl" "$CACHE/index/simple/$name/"
    done
}

cmd_build() {
    local tag="${1:-adaptive-inference:local}"
    alive || die "dockerd is not running: '$0 start' first"
    cmd_base
    cmd_wheels
    local port_file="$CACHE/index.port"
    rm -f "$port_file"
    # A fixed port when it is free: the index URL is a build arg, and the legacy builder keys the
    # cache of every RUN after it on the args' values, so a new port would re-run `pip install`.
    # Taken: any free port (the kernel's pick), read back from the file the server writes.
    "$PYTHON" - "$CACHE/index" "$port_file" "${INDEX_PORT:-38471}" <<'EOF' &
import functools, http.server, sys
class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass  # pip fetches a page and a file per wheel
handler = functools.partial(Quiet, directory=sys.argv[1])
try:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), handler)
except OSError:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
with httpd:
    open(sys.argv[2], "w").write(str(httpd.server_port))
    httpd.serve_forever()
EOF
    local index_pid=$!
    # shellcheck disable=SC2064 # expand now: the pid is known
    trap "kill $index_pid 2>/dev/null || true" EXIT
    for _ in $(seq 1 50); do [ -s "$port_file" ] && break; sleep 0.1; done
    [ -s "$port_file" ] || die "the wheel index did not start"
    local index="http://127.0.0.1:$(cat "$port_file")/simple/"
    log "docker build $tag (base $BASE_IMAGE, index $index)"
    docker_ build --network host --build-arg "PYTHON=$BASE_IMAGE" \
        --build-arg "PIP_INDEX_URL=$index" -t "$tag" "$ROOT"
    kill "$index_pid" 2>/dev/null || true
    wait "$index_pid" 2>/dev/null || true
    trap - EXIT
    # Each rebuild leaves the previous image and build stage untagged: drop the day-old ones (the
    # recent ones are the layer cache of the next build).
    docker_ image prune -f --filter until=24h >/dev/null
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    base) alive || die "dockerd is not running"; cmd_base ;;
    wheels) cmd_wheels ;;
    build) shift; cmd_build "$@" ;;
    env) echo "export DOCKER_HOST=unix://$SOCK" ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
