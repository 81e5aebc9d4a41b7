#!/usr/bin/env bash
# Installs the proxy as a systemd service on a Linux host, or removes it.
#
#   scripts/install.sh [--binary PATH] [--prefix DIR] [--destdir DIR] [--user NAME]
#                      [--redis-url URL] [--managed-identity]
#   scripts/install.sh --uninstall [--prefix DIR] [--destdir DIR]
#
# Installs:
#   PREFIX/bin/azure-openai-proxy                  the binary (default PREFIX /usr/local)
#   /etc/azure-openai-proxy/{base,production}.yaml the config (kept if already there)
#   /etc/azure-openai-proxy/env                    secrets, KEY=VALUE, read by the proxy at start
#                                                  and on each reload (--env-file; root:USER 0640, kept)
#   /etc/systemd/system/azure-openai-proxy.service the unit: restart on failure, an
#                                                  unprivileged user, SIGHUP to reload
# Running it again upgrades the binary and the unit and leaves config and secrets alone.
# --redis-url shares state with the other proxies of a fleet (docs/several-proxies.md):
# it sets REDIS_URL in the env file (replacing an earlier one) and adds
# `redis: {url: ${REDIS_URL}}` to production.yaml unless that names redis already.
# --managed-identity installs a config without keys: each instance authenticates with
# the host's managed identity (Microsoft Entra ID; docs/keyless-azure.md), and the env
# file holds no key. Grant the identity "Cognitive Services OpenAI User" on each resource.
# It shapes only a config the run creates: an existing one is left as it is.
# --uninstall removes the binary and the unit; the config directory stays (it holds keys).
# --destdir installs under another root (for packaging or a test) and then touches no
# user account and no systemd.
set -euo pipefail
cd "$(dirname "$0")/.."

name=azure-openai-proxy
prefix=/usr/local
destdir=""
user=$name
binary=""
uninstall=false
redis_url=""
managed_identity=false
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --destdir) destdir=${2%/}; shift 2 ;;
    --user) user=$2; shift 2 ;;
    --redis-url) redis_url=$2; shift 2 ;;
    --managed-identity) managed_identity=true; shift ;;
    --uninstall) uninstall=true; shift ;;
    # The comment block under the shebang, and nothing after it.
    -h|--help) awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

bin_path=$prefix/bin/$name
etc=/etc/$name
unit_path=/etc/systemd/system/$name.service
real_root=$([ -z "$destdir" ] && echo true || echo false)
has_systemd=$($real_root && command -v systemctl >/dev/null && [ -d /run/systemd/system ] && echo true || echo false)

if $uninstall; then
  if $has_systemd; then systemctl disable --now "$name" 2>/dev/null || true; fi
  rm -f "$destdir$bin_path" "$destdir$unit_path"
  if $has_systemd; then systemctl daemon-reload; fi
  echo "removed $destdir$bin_path and $destdir$unit_path; $destdir$etc is kept (it holds your keys)"
  exit 0
fi

if [ -z "$binary" ]; then
  t=${CARGO_TARGET_DIR:-target}
  for candidate in "$t/x86_64-unknown-linux-musl/release/$name" "$t/release/$name"; do
    [ -x "$candidate" ] && { binary=$candidate; break; }
  done
fi
[ -n "$binary" ] && [ -x "$binary" ] || { echo "no binary: build with scripts/build-static.sh or pass --binary" >&2; exit 1; }

if $real_root && ! id "$user" >/dev/null 2>&1; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
fi

install -d "$destdir$prefix/bin" "$destdir$etc" "$destdir$(dirname "$unit_path")"
install -m 0755 "$binary" "$destdir$bin_path.new"
mv -f "$destdir$bin_path.new" "$destdir$bin_path"

for f in base.yaml production.yaml; do
  [ -e "$destdir$etc/$f" ] && continue
  if $managed_identity; then
    # Every instance's key becomes the host's managed identity.
    sed -E 's/^( *)api_key: .*/\1credential: managed_identity/' "config/$f" >"$destdir$etc/$f"
    chmod 0644 "$destdir$etc/$f"
  else
    install -m 0644 "config/$f" "$destdir$etc/$f"
  fi
done
if [ ! -e "$destdir$etc/env" ]; then
  keys=$'AZURE_OPENAI_KEY_EAST=\nAZURE_OPENAI_KEY_WEST=\n'
  if $managed_identity; then keys=""; fi
  (umask 077 && cat >"$destdir$etc/env" <<ENV
# Secrets for $name, referenced as \${VAR} in $etc/production.yaml. The proxy reads
# this file (--env-file) at start and again on each reload (systemctl reload $name), so
# a rotated key needs no restart. Owned by root, readable by the service's group only.
${keys}AZURE_OPENAI_BASE_EAST=
AZURE_OPENAI_BASE_WEST=
# FEISHU_WEBHOOK=
ENV
  )
fi
if [ -n "$redis_url" ]; then
  case "$redis_url" in
    redis://*|rediss://*) ;;
    *) echo "--redis-url must be a redis:// or rediss:// URL" >&2; exit 2 ;;
  esac
  env_file=$destdir$etc/env
  (umask 077 && { grep -v '^REDIS_URL=' "$env_file" || true; printf 'REDIS_URL=%s\n' "$redis_url"; } >"$env_file.new")
  mv -f "$env_file.new" "$env_file"
  grep -q '^redis:' "$destdir$etc/production.yaml" ||
    printf '# Several proxies share windows, cooldowns, circuits and affinity here.\nredis:\n  url: ${REDIS_URL}\n' >>"$destdir$etc/production.yaml"
fi

# The service reads the file itself (an earlier version left it root-only, for systemd).
chmod 0640 "$destdir$etc/env"
if $real_root; then chgrp "$user" "$destdir$etc/env"; fi

cat >"$destdir$unit_path" <<UNIT
[Unit]
Description=azure-openai-proxy: OpenAI-compatible proxy for Azure OpenAI instances
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=$user
Group=$user
Environment=ENVIRONMENT=production
# Not EnvironmentFile=: systemd reads that only at start, the proxy reads it on reload too.
ExecStartPre=$bin_path --check-config --config-dir $etc --env-file $etc/env
ExecStart=$bin_path --config-dir $etc --env-file $etc/env
ExecReload=/bin/kill -HUP \$MAINPID
Restart=on-failure
RestartSec=2
# server.shutdown_grace_seconds (30 by default) plus a margin.
TimeoutStopSec=40
LimitNOFILE=65536
NoNewPrivileges=true
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
LogsDirectory=$name

[Install]
WantedBy=multi-user.target
UNIT

if $has_systemd; then
  systemctl daemon-reload
  systemctl enable "$name" >/dev/null
  echo "installed; put your keys in $etc/env, then: systemctl start $name"
else
  echo "installed under ${destdir:-/} (no systemd actions taken); put your keys in ${destdir}$etc/env"
fi
