#!/usr/bin/env bash
# docker.sh: a Docker engine and the images hookbridge's tests and compose stack run on.
#
# Subcommands:
#   engine        Make sure a Docker engine answers. When none does and the machine allows it
#                 (root or sudo, apt-get), install Debian's docker.io and start dockerd in the
#                 background (data root, pid and log under $HOOKBRIDGE_CACHE/docker). When that
#                 is impossible, print ONE line saying why and exit 1.
#   images        Make the broker images available and print `export` lines naming them (meant
#                 for eval): the official ones when they can be pulled, else local builds.
#   up            engine, then images, then a container whose published port must answer
#                 (what scripts/test.sh runs).
#   base          Build the local Debian base image (no registry needed); print its name.
#   builder       Build the local Rust builder image (the host's rustup toolchain on the local
#                 base, for the Dockerfile's RUST_IMAGE build arg); print its name.
#   compose       Make sure Docker Compose v2 or later answers as `docker compose` and print the
#                 command that runs it (`docker compose`; `docker-compose` for the fallback).
#                 When the engine is up and no Compose v2+ is found, build Docker Compose
#                 $COMPOSE_VERSION from the Go module proxy (about 160 CPU-seconds; the binary is
#                 cached in $HOOKBRIDGE_CACHE/compose-VERSION) and install it as the Docker CLI
#                 plugin ($DOCKER_CONFIG/cli-plugins/docker-compose, a link to the cached binary).
#                 Only when that build is impossible (no Go, no proxy), Debian's docker-compose
#                 1.29 (Compose v1, end-of-life) is used, installed with apt-get if missing,
#                 and one line says so.
#   sweep         Remove test containers whose test process has exited (tests label them
#                 org.hookbridge.test-pid; scripts/test.sh runs this after the tests).
#   stop          Stop the dockerd that `engine` started.
#
# Environment:
#   HOOKBRIDGE_TEST_KAFKA_IMAGE    Kafka image for tests and compose (default apache/kafka:4.1.1)
#   HOOKBRIDGE_TEST_NATS_IMAGE     NATS image for tests and compose (default nats:2.15.3-alpine, the
#                                  version scripts/brokers.sh builds)
#   HOOKBRIDGE_TEST_DOCKER_IMAGES  auto (default): use the images named above when present or
#                                  pullable, else build local ones; local: always build;
#                                  official: never build
#   HOOKBRIDGE_CACHE               cache root (default ~/.cache/hookbridge)
#   DOCKER_CONFIG                  the Docker client's configuration (default ~/.docker)
#
# Local images are tagged with a hash of everything that went into them, so they are
# rebuilt only when an input changes. The base is `debootstrap --variant=minbase` from the
# mirror apt already uses, then `docker import`; its tarball stays in the cache.
#
# Apart from the export lines and image names, everything this script prints goes to stderr.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_PATH=$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

CACHE_DIR=${HOOKBRIDGE_CACHE:-$HOME/.cache/hookbridge}
DOCKER_STATE=$CACHE_DIR/docker
SUITE=bookworm
KAFKA_VERSION=4.1.1
OFFICIAL_KAFKA=apache/kafka:$KAFKA_VERSION
# The nats-server version lives in brokers.sh (NATS_VERSION); the local image runs its build.
NATS_VERSION=$(bash "$SCRIPT_DIR/brokers.sh" nats-version)
OFFICIAL_NATS=nats:${NATS_VERSION#v}-alpine
# Docker Compose built from the Go module proxy when none is installed: a release that builds
# with this machine's Go. Its version is printed through -ldflags (the module's `internal`
# package holds it, as the upstream Makefile sets it).
COMPOSE_MODULE=github.com/docker/compose/v5
COMPOSE_VERSION=v5.6.0
COMPOSE_BUILD_TIMEOUT=900
# Bounded waits.
ENGINE_START_TIMEOUT=60
PULL_TIMEOUT=120

log() { printf 'docker.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
# The one line a caller shows when there is no engine, then exit 1.
no_engine() {
  printf 'docker.sh: no Docker engine: %s\n' "$*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$SCRIPT_PATH" >&2
  exit "${1:-2}"
}

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  else
    sudo -n "$@"
  fi
}

engine_answers() {
  command -v docker >/dev/null && timeout 20 docker info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

hash_of() { sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------
# engine

cmd_engine() {
  engine_answers && return 0
  if [[ $EUID -ne 0 ]] && ! sudo -n true 2>/dev/null; then
    no_engine "none answers, and starting one needs root (or password-less sudo)"
  fi
  if ! command -v dockerd >/dev/null; then
    command -v apt-get >/dev/null || no_engine "none answers, dockerd is not installed, and there is no apt-get to install it"
    log "apt-get install docker.io"
    {
      as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io
    } >&2 || no_engine "apt-get install docker.io failed"
  fi
  # The plain `docker` of docker.io, when no other client is on PATH.
  command -v docker >/dev/null || no_engine "dockerd is installed but no docker client is"
  mkdir -p "$DOCKER_STATE"
  local logfile=$DOCKER_STATE/dockerd.log pid
  if [[ -f $DOCKER_STATE/dockerd.pid ]]; then
    pid=$(<"$DOCKER_STATE/dockerd.pid")
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]]; then
      no_engine "the dockerd started earlier (pid $pid) does not answer (log: $logfile)"
    fi
    as_root rm -f "$DOCKER_STATE/dockerd.pid" # left by a daemon that is gone
  fi
  log "starting dockerd (data root $DOCKER_STATE/data, log $logfile)"
  # setsid: the daemon outlives this script and its process group (it serves later runs too).
  as_root setsid dockerd --data-root "$DOCKER_STATE/data" --pidfile "$DOCKER_STATE/dockerd.pid" \
    </dev/null >>"$logfile" 2>&1 &
  pid=$!
  local deadline=$((SECONDS + ENGINE_START_TIMEOUT))
  until engine_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      no_engine "dockerd exited: $(grep -v '^\s*$' "$logfile" | tail -n 1 | cut -c1-300)"
    fi
    ((SECONDS < deadline)) || no_engine "dockerd did not answer within ${ENGINE_START_TIMEOUT}s (log: $logfile)"
    sleep 0.3
  done
  log "dockerd $(docker info --format '{{.ServerVersion}}' 2>/dev/null) answers"
}

cmd_stop() {
  local f=$DOCKER_STATE/dockerd.pid pid
  [[ -f $f ]] || return 0
  pid=$(<"$f")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]] || return 0
  as_root kill -TERM "$pid"
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
}

# ---------------------------------------------------------------------------
# images

image_present() { docker image inspect "$1" >/dev/null 2>&1; }

# Legacy builder: it needs no buildx plugin, and these Dockerfiles need nothing newer.
build_image() {
  local tag=$1 ctx=$2
  shift 2
  log "building $tag"
  DOCKER_BUILDKIT=0 docker build -q --force-rm -t "$tag" "$@" "$ctx" >/dev/null 2>"$DOCKER_STATE/build.err" || {
    tail -n 30 "$DOCKER_STATE/build.err" >&2
    die "building $tag failed"
  }
}

# The first deb mirror URL apt is configured with (deb822 or one-line format).
apt_mirror() {
  local url
  url=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1 || true)
  [[ -n $url ]] || url=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
    awk '{for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' | head -n 1 || true)
  printf '%s' "${url:-http://deb.debian.org/debian}"
}

# The host's apt sources, copied into the base so builds on it install from the same mirror.
apt_sources_tar() {
  tar -C / -c --ignore-failed-read etc/apt/sources.list $(cd / && ls etc/apt/sources.list.d/*.sources etc/apt/sources.list.d/*.list 2>/dev/null) 2>/dev/null
}

cmd_base() {
  local mirror inputs h tag tarball
  mirror=$(apt_mirror)
  inputs=$({
    echo "$SUITE minbase $mirror v1"
    apt_sources_tar | sha256sum
  })
  h=$(hash_of <<<"$inputs")
  tag=hookbridge-local/debian:$SUITE-$h
  if ! image_present "$tag"; then
    mkdir -p "$CACHE_DIR/debian"
    tarball=$CACHE_DIR/debian/$SUITE-minbase-$h.tar
    if [[ ! -f $tarball ]]; then
      command -v debootstrap >/dev/null || {
        log "apt-get install debootstrap"
        as_root apt-get update -qq >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
      }
      local rootfs=$CACHE_DIR/debian/rootfs.tmp
      as_root rm -rf "$rootfs"
      mkdir -p "$rootfs"
      log "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
      as_root debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE_DIR/debian/debootstrap.log" 2>&1 || {
        tail -n 20 "$CACHE_DIR/debian/debootstrap.log" >&2
        die "debootstrap failed (log: $CACHE_DIR/debian/debootstrap.log)"
      }
      as_root rm -f "$rootfs/etc/apt/sources.list"
      apt_sources_tar | as_root tar -C "$rootfs" -x
      as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
      as_root tar -C "$rootfs" -c . >"$tarball.tmp"
      mv "$tarball.tmp" "$tarball"
      as_root rm -rf "$rootfs"
    fi
    log "docker import $tarball as $tag"
    docker import -c 'CMD ["bash"]' "$tarball" "$tag" >/dev/null
  fi
  printf '%s\n' "$tag"
}

# A build context under the cache: the files of docker/NAME plus whatever the caller adds.
fresh_context() {
  local ctx=$DOCKER_STATE/context/$1
  rm -rf "$ctx"
  mkdir -p "$ctx"
  cp -a "$ROOT/docker/$1/." "$ctx/"
  printf '%s' "$ctx"
}

local_kafka() {
  local base=$1 h tag ctx libs
  bash "$SCRIPT_DIR/brokers.sh" install >&2 # Maven, and the jars fetched into the cache
  libs=$(bash "$SCRIPT_DIR/brokers.sh" libs)
  h=$({
    echo "$base"
    cat "$libs/.complete"
    tar -C "$ROOT/docker/kafka" -c --sort=name --mtime=@0 --owner=0 --group=0 . | sha256sum
  } | hash_of)
  tag=hookbridge-local/kafka:$KAFKA_VERSION-$h
  if ! image_present "$tag"; then
    ctx=$(fresh_context kafka)
    cp -al "$libs" "$ctx/libs" 2>/dev/null || cp -a "$libs" "$ctx/libs"
    build_image "$tag" "$ctx" --build-arg "BASE_IMAGE=$base"
  fi
  printf '%s' "$tag"
}

# nats-server from `brokers.sh nats-bin` (v2.15.3 built from the Go module proxy; Debian's,
# with a line saying so, only when that build is impossible). The tag names the version it
# reports and hashes the binary itself, so a new version builds a new image.
local_nats() {
  local base=$1 h tag ctx bin version
  bin=$(bash "$SCRIPT_DIR/brokers.sh" nats-bin)
  version=$("$bin" --version 2>&1 | sed -n 's/^nats-server: v\{0,1\}//p')
  [[ -n $version ]] || die "$bin does not report its version (nats-server --version)"
  h=$({
    echo "$base"
    sha256sum <"$bin"
    tar -C "$ROOT/docker/nats" -c --sort=name --mtime=@0 --owner=0 --group=0 . | sha256sum
  } | hash_of)
  tag=hookbridge-local/nats:$version-$h
  if ! image_present "$tag"; then
    ctx=$(fresh_context nats)
    cp "$bin" "$ctx/nats-server"
    build_image "$tag" "$ctx" --build-arg "BASE_IMAGE=$base"
  fi
  printf '%s' "$tag"
}

# pullable IMAGE: present already, or pulled within the time limit.
pullable() {
  image_present "$1" && return 0
  log "docker pull $1"
  timeout "$PULL_TIMEOUT" docker pull -q "$1" >/dev/null 2>&1
}

cmd_images() {
  local mode=${HOOKBRIDGE_TEST_DOCKER_IMAGES:-auto}
  local kafka=${HOOKBRIDGE_TEST_KAFKA_IMAGE:-$OFFICIAL_KAFKA} nats=${HOOKBRIDGE_TEST_NATS_IMAGE:-$OFFICIAL_NATS}
  local need_kafka=1 need_nats=1
  case $mode in
    auto | official)
      pullable "$kafka" && need_kafka=0
      # One registry answers both: no point waiting on a second pull when the first failed.
      if ((need_kafka == 0)) || [[ -n ${HOOKBRIDGE_TEST_NATS_IMAGE:-} ]]; then
        pullable "$nats" && need_nats=0
      fi
      if [[ $mode == official ]] && ((need_kafka + need_nats)); then
        die "cannot pull $kafka / $nats (HOOKBRIDGE_TEST_DOCKER_IMAGES=official)"
      fi
      ;;
    local) ;;
    *) die "HOOKBRIDGE_TEST_DOCKER_IMAGES must be auto, local or official (got '$mode')" ;;
  esac
  if ((need_kafka + need_nats)); then
    log "local images (no registry answered)"
    local base
    base=$(cmd_base)
    ((need_kafka == 0)) || kafka=$(local_kafka "$base")
    ((need_nats == 0)) || nats=$(local_nats "$base")
  fi
  log "images: Kafka $kafka, NATS $nats"
  printf 'export HOOKBRIDGE_TEST_KAFKA_IMAGE=%q\n' "$kafka"
  printf 'export HOOKBRIDGE_TEST_NATS_IMAGE=%q\n' "$nats"
}

# The host's rustup toolchain (compiler, cargo, std for this target; no docs) and its extra
# certificate authorities on the local base, so the Dockerfile builds here without the rust image.
cmd_builder() {
  command -v rustc >/dev/null || die "rustc not found"
  local sysroot base h tag ctx
  sysroot=$(rustc --print sysroot)
  # A self-contained toolchain directory (rustup's), not a system prefix like /usr.
  [[ $sysroot != /usr && -x $sysroot/bin/cargo && -d $sysroot/lib/rustlib ]] ||
    die "the builder image copies a rustup toolchain; $sysroot is not one"
  base=$(cmd_base)
  h=$({
    echo "$base"
    rustc -vV
    cargo -V
    tar -C "$ROOT/docker/rust" -c --sort=name --mtime=@0 --owner=0 --group=0 . | sha256sum
    cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum
  } | hash_of)
  tag=hookbridge-local/rust:$(rustc -V | awk '{print $2}')-$h
  if ! image_present "$tag"; then
    ctx=$(fresh_context rust)
    mkdir -p "$ctx/toolchain/bin" "$ctx/toolchain/lib/rustlib"
    cp -a "$sysroot/bin/rustc" "$sysroot/bin/cargo" "$ctx/toolchain/bin/"
    cp -a "$sysroot"/lib/*.so* "$ctx/toolchain/lib/"
    local target
    target=$(rustc -vV | awk '/^host:/ {print $2}')
    cp -a "$sysroot/lib/rustlib/$target" "$ctx/toolchain/lib/rustlib/"
    cp -a "$sysroot/lib/rustlib/etc" "$ctx/toolchain/lib/rustlib/" 2>/dev/null || true
    # Certificate authorities this machine trusts beyond Debian's (e.g. a TLS-inspecting
    # egress proxy), so cargo inside the build reaches crates.io as the host does.
    mkdir -p "$ctx/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ctx/ca-certificates/" 2>/dev/null || true
    build_image "$tag" "$ctx" --build-arg "BASE_IMAGE=$base"
  fi
  printf '%s\n' "$tag"
}

# ---------------------------------------------------------------------------
# compose

PLUGIN_DIR=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
COMPOSE_BIN=$CACHE_DIR/compose-$COMPOSE_VERSION/docker-compose
# Why the last build_compose / install_compose failed (one line).
COMPOSE_WHY=

# version_of CMD...: the version CMD reports with `version --short` (no leading v).
version_of() {
  local v
  v=$(timeout 20 "$@" version --short 2>/dev/null | head -n 1) || return 1
  v=${v#v}
  [[ $v =~ ^[0-9]+\. ]] || return 1
  printf '%s' "$v"
}

# v2_or_later VERSION
v2_or_later() { ((${1%%.*} >= 2)); }

# The plugin link is ours when it points into the cache (a link this script made).
plugin_is_ours() {
  local link=$PLUGIN_DIR/docker-compose
  [[ -L $link && $(readlink "$link") == "$CACHE_DIR"/compose-* ]]
}

# Docker Compose $COMPOSE_VERSION in the cache, built from the Go module proxy when missing.
# `go install MODULE/cmd@VERSION` is refused for this module (its go.mod has exclude
# directives), so the module is downloaded and its ./cmd package built.
build_compose() {
  local dir=${COMPOSE_BIN%/*} want=${COMPOSE_VERSION#v} got buildlog moddir t0=$SECONDS
  if [[ -x $COMPOSE_BIN ]] && [[ $(version_of "$COMPOSE_BIN") == "$want" ]]; then
    return 0
  fi
  command -v go >/dev/null || {
    COMPOSE_WHY="go is not installed"
    return 1
  }
  mkdir -p "$dir"
  buildlog=$dir/build.log
  log "building Docker Compose $COMPOSE_VERSION from the Go module proxy with $(go env GOVERSION) (about 160 CPU-seconds with empty Go caches; log $buildlog)"
  # Outside any Go module of the caller's, so only the module named here is resolved.
  (cd "$dir" && timeout "$COMPOSE_BUILD_TIMEOUT" go mod download -json "$COMPOSE_MODULE@$COMPOSE_VERSION" \
    >"$dir/download.json" 2>"$buildlog") || true
  moddir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' "$dir/download.json")
  if [[ -z $moddir || ! -d $moddir/cmd ]]; then
    COMPOSE_WHY="go mod download $COMPOSE_MODULE@$COMPOSE_VERSION failed: $(cat "$dir/download.json" "$buildlog" 2>/dev/null |
      grep -m 1 -i 'error' | sed 's/^[[:space:]]*//' | cut -c1-200)"
    return 1
  fi
  if ! (cd "$moddir" && timeout "$COMPOSE_BUILD_TIMEOUT" go build -trimpath \
    -ldflags "-w -X $COMPOSE_MODULE/internal.Version=$COMPOSE_VERSION" \
    -o "$COMPOSE_BIN.tmp" ./cmd) >>"$buildlog" 2>&1; then
    rm -f "$COMPOSE_BIN.tmp"
    COMPOSE_WHY="go build of $COMPOSE_MODULE@$COMPOSE_VERSION failed: $(grep -v '^\s*$' "$buildlog" | tail -n 1 | cut -c1-200) (log: $buildlog)"
    return 1
  fi
  got=$(version_of "$COMPOSE_BIN.tmp") || got=none
  if [[ $got != "$want" ]]; then
    rm -f "$COMPOSE_BIN.tmp"
    COMPOSE_WHY="the Compose just built reports version $got, not $want"
    return 1
  fi
  mv -f "$COMPOSE_BIN.tmp" "$COMPOSE_BIN"
  log "built Docker Compose $COMPOSE_VERSION in $((SECONDS - t0)) s ($COMPOSE_BIN)"
}

# The cached binary as the Docker CLI plugin: a link, replaced only when it is ours or absent.
install_compose() {
  local link=$PLUGIN_DIR/docker-compose
  if [[ -e $link || -L $link ]] && ! plugin_is_ours; then
    COMPOSE_WHY="$link is there but does not answer as Compose v2 or later (remove it to let this script install one)"
    return 1
  fi
  mkdir -p "$PLUGIN_DIR"
  ln -sfn "$COMPOSE_BIN" "$link"
  local got
  got=$(version_of docker compose) || {
    COMPOSE_WHY="installed $link, but \`docker compose version\` does not answer"
    return 1
  }
  log "installed Docker Compose $got as the Docker CLI plugin $link"
}

# Debian's docker-compose 1.29 (Compose v1), installed with apt-get when missing and allowed.
compose_v1() {
  command -v docker-compose >/dev/null && return 0
  command -v apt-get >/dev/null || return 1
  [[ $EUID -eq 0 ]] || sudo -n true 2>/dev/null || return 1
  log "apt-get install docker-compose"
  {
    as_root apt-get update -qq &&
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose
  } >&2 && command -v docker-compose >/dev/null
}

cmd_compose() {
  local v
  # A Compose of our own from an earlier pin is replaced by the current one.
  if v=$(version_of docker compose) && v2_or_later "$v" &&
    ! { plugin_is_ours && [[ $(readlink "$PLUGIN_DIR/docker-compose") != "$COMPOSE_BIN" ]]; }; then
    log "Docker Compose $v (docker compose)"
    printf 'docker compose\n'
    return 0
  fi
  if v=$(version_of docker-compose) && v2_or_later "$v"; then
    log "Docker Compose $v (docker-compose)"
    printf 'docker-compose\n'
    return 0
  fi
  if build_compose && install_compose; then
    printf 'docker compose\n'
    return 0
  fi
  local why=$COMPOSE_WHY
  if compose_v1 && v=$(version_of docker-compose); then
    log "falling back to docker-compose $v (Compose v1, end-of-life since 2023): cannot install Docker Compose $COMPOSE_VERSION: $why"
    printf 'docker-compose\n'
    return 0
  fi
  die "no Docker Compose: cannot install Docker Compose $COMPOSE_VERSION ($why), and no docker-compose to fall back on"
}

# A container with a published port that answers from the host: what the tests need. Run
# once the images exist, so a machine whose engine starts but cannot run or reach
# containers is found here (and the caller can fall back) rather than in the tests.
preflight() {
  local nats=$1 id port
  id=$(docker run -d --rm -p 127.0.0.1::4222 "$nats" -js 2>&1) || no_engine "cannot run a container: ${id//$'\n'/ }"
  port=$(docker port "$id" 4222/tcp | head -n 1 | sed 's/.*://')
  if ! bash "$SCRIPT_DIR/brokers.sh" wait-nats "$port" 30 2>/dev/null; then
    docker rm -f "$id" >/dev/null 2>&1 || true
    no_engine "a container's published port does not answer from the host"
  fi
  docker rm -f "$id" >/dev/null 2>&1 || true
}

cmd_sweep() {
  local id pid stale=()
  engine_answers || return 0
  while read -r id pid; do
    [[ -n $id && -n $pid && ! -d /proc/$pid ]] && stale+=("$id")
  done < <(docker ps -a --filter label=org.hookbridge.test-pid \
    --format '{{.ID}} {{.Label "org.hookbridge.test-pid"}}')
  ((${#stale[@]} == 0)) || docker rm -f "${stale[@]}" >/dev/null
}

main() {
  (($#)) || usage
  local cmd=$1
  shift
  case $cmd in
    engine) cmd_engine ;;
    images)
      engine_answers || no_engine "none answers (run: $SCRIPT_PATH engine)"
      mkdir -p "$DOCKER_STATE"
      cmd_images
      ;;
    up)
      cmd_engine
      mkdir -p "$DOCKER_STATE"
      local exports
      exports=$(cmd_images)
      eval "$exports"
      preflight "$HOOKBRIDGE_TEST_NATS_IMAGE"
      printf '%s\n' "$exports"
      ;;
    base) mkdir -p "$DOCKER_STATE" && cmd_base ;;
    builder) mkdir -p "$DOCKER_STATE" && cmd_builder ;;
    compose)
      engine_answers || no_engine "none answers (run: $SCRIPT_PATH engine)"
      cmd_compose
      ;;
    sweep) cmd_sweep ;;
    stop) cmd_stop ;;
    -h | --help | help) usage 0 ;;
    *) usage ;;
  esac
}

main "$@"
