#!/usr/bin/env bash
# Builds a fully static x86_64 Linux binary of the proxy (rustls, no OpenSSL), checks
# that it is static and that it resolves `localhost`, and prints its path and size.
#
#   scripts/build-static.sh            # musl if it can be had, else static glibc
#   CARGO_FLAGS=--no-default-features scripts/build-static.sh   # without Redis support
#
# musl is preferred: its static resolver reads /etc/hosts and /etc/resolv.conf itself.
# glibc's static getaddrinfo would need the host's NSS modules at run time.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '%s\n' "$*" >&2; }

musl_ready() {
  rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl &&
    command -v x86_64-linux-musl-gcc >/dev/null && command -v make >/dev/null
}

if ! musl_ready; then
  say "setting up the musl target (rustup target + Debian's musl-tools and make for the C code of ring and jemalloc)"
  rustup target add x86_64-unknown-linux-musl >&2 || true
  if ! { command -v x86_64-linux-musl-gcc && command -v make; } >/dev/null && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq musl-tools make) >&2 || true
  fi
fi

if musl_ready; then
  target=x86_64-unknown-linux-musl
  libc="musl"
  # A plain static executable, not static-pie: `ldd` then says "not a dynamic executable".
  export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static"
else
  say "musl is not available; falling back to static glibc (DNS lookups then need the host's NSS files)"
  target=x86_64-unknown-linux-gnu
  libc="glibc (crt-static)"
  export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static"
fi

say "building release for $target ($libc)"
# CARGO_FLAGS: extra words for cargo build (e.g. --no-default-features), split on spaces.
read -ra extra <<<"${CARGO_FLAGS:-}"
cargo build --release --locked --target "$target" "${extra[@]}" >&2
bin="${CARGO_TARGET_DIR:-target}/$target/release/azure-openai-proxy"

linkage=$(ldd "$bin" 2>&1 || true)
case "$linkage" in
  *"not a dynamic executable"*) ;;
  *) say "error: $bin is not fully static: $linkage"; exit 1 ;;
esac

# Name resolution with the static binary: an upstream at http://localhost:PORT must be
# reached (any HTTP answer from it proves the lookup and the connect worked).
smoke=$(mktemp -d)
cleanup() { kill "${up_pid:-}" "${px_pid:-}" 2>/dev/null || true; rm -rf "$smoke"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(free_port)
px_port=$(free_port)
python3 -m http.server --bind 127.0.0.1 "$up_port" --directory "$smoke" >/dev/null 2>&1 &
up_pid=$!
for _ in $(seq 1 100); do
  curl -s -o /dev/null "http://127.0.0.1:$up_port/" && break
  sleep 0.05
done
cat >"$smoke/base.yaml" <<YAML
host: 127.0.0.1
port: $px_port
server: {workers: 2}
routing: {retries: 0, timeout: 5, connect_timeout: 5}
instances:
  - {name: local, api_key: smoke, api_base: 'http://localhost:$up_port', api_version: 2024-10-21, supported_models: [m]}
YAML
"$bin" --config-dir "$smoke" 2>"$smoke/proxy.log" &
px_pid=$!
status=""
for _ in $(seq 1 100); do
  status=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$px_port/v1/embeddings" \
    -H 'content-type: application/json' -d '{"model":"m","input":"x"}' || true)
  [ "$status" != "000" ] && break
  sleep 0.1
done
# python's http.server answers POST with 501; 502 would mean localhost did not resolve.
if [ "$status" != "501" ]; then
  say "error: the static binary could not reach http://localhost:$up_port (status $status)"
  cat "$smoke/proxy.log" >&2
  exit 1
fi

size=$(stat -c %s "$bin")
say "static ($libc): $linkage"
say "localhost resolved and reached from the static binary"
printf '%s %s bytes (%s MiB)\n' "$bin" "$size" "$(awk "BEGIN{printf \"%.2f\", $size/1048576}")"
