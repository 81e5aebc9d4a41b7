#!/usr/bin/env bash
# Measures the proxy against references in one run:
#   direct:  a fast upstream (nginx answering a fixed Azure-like JSON/SSE body),
#   nginx:   nginx proxy_pass in front of it,
#   proxy:   this proxy (the static binary, default settings) in front of it;
# requests/s and latency p50/p99 at 1, 16, 64 and 256 connections (wrk), in ROUNDS
# interleaved rounds (this class of machine moves 10-50 % from one minute to the next):
# the table shows medians, and each ratio is the median of the ratios within a round,
# where the targets were measured back to back; SSE time to first byte; a normal request's latency with 2,000 idle
# and 500 slowloris connections open; RSS idle and holding 1,000 and 10,000 streams
# (from an upstream that sends an event at once, then one every 10 s);
# start-up time; the static binary's size; the latency Redis adds: a second
# proxy with `redis:` (a redis-server of its own on loopback) and a TPM window, measured
# in the same rounds at 1 and 16 connections. Each target row shows the measured value,
# the target, and met or missed.
#
# Holding 10,000 streams takes 20,010 descriptors in the proxy: with a lower hard limit
# (`ulimit -Hn`), the script holds as many as fit and says how many.
#
#   scripts/bench.sh            # prints the report
#   scripts/bench.sh --write    # ... and writes it to bench/results.md
#   DURATION=10s ROUNDS=5 MANY_STREAMS=10000 scripts/bench.sh
#   BIN=target/release/azure-openai-proxy scripts/bench.sh   # measure this binary, no build
#   scripts/bench.sh long-generation   # only that scenario (bench/long_generation.py)
#   scripts/bench.sh embeddings-rss   # only: peak RSS relaying 16 concurrent 82 MB answers
#   scripts/bench.sh partial-heads   # only this: PARTIAL_HEADS (4,200) half-sent heads
#                                    # from one address held open, then /health and a
#                                    # chat request, 20 times each: the max latency
#   scripts/bench.sh builds [--write]  # only this (bench/builds.sh): the glibc build, the
#                                    # static binary and nginx proxy_pass at 16, 64 and 256
#                                    # connections, with and without Redis, then at fixed
#                                    # rates with oha (p50/p99/p99.9); --write replaces its
#                                    # section of bench/results.md.
#   BEFORE=/path/to/older/static/binary scripts/bench.sh builds   # ... and that binary too
#
# The embeddings step (also part of the full run): 16 embeddings requests at once, each
# answered by a local Python upstream with 2,048 x 3,072 floats (about 82 MB), read to
# the end by 16 clients; the figure is the proxy's peak RSS (VmHWM).
#
# Installs nginx, wrk, redis-server and musl-tools from Debian's packages when missing. Everything
# listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

write=false
only=""
for arg in "$@"; do
  case "$arg" in
    --write) write=true ;;
    long-generation) only=$arg ;;
    embeddings-rss) only=$arg ;;
    partial-heads) only=$arg ;;
    builds) only=$arg ;;
    -h|--help) sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

# Long generations beside small requests on two healthy instances: needs neither nginx
# nor the references, so it runs alone.
if [ "${only:-}" = long-generation ]; then
  bin=${BIN:-$(scripts/build-static.sh | awk '{print $1}')}
  exec python3 bench/long_generation.py "$bin" "${LONG_SECONDS:-50}"
fi

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-5}
CONNS=(1 16 64 256)
STREAMS=${STREAMS:-1000}
# Room for the held streams: each is two descriptors in the proxy (and one in each load
# process). As many as 10,000 if the descriptor limit allows, else as many as it does.
ulimit -n "$(ulimit -Hn)"
MANY_STREAMS=${MANY_STREAMS:-$(( $(ulimit -n) / 2 - 32 < 10000 ? $(ulimit -n) / 2 - 32 : 10000 ))}
IDLE=${IDLE:-2000}
PARTIAL_HEADS=${PARTIAL_HEADS:-4200}
SLOWLORIS=${SLOWLORIS:-500}
UP=18181       # the fast upstream (nginx)
NGX=18182      # nginx proxy_pass
PX=18183       # this proxy
SLOW=18184     # a slow SSE upstream for the held-streams steps
RDS=18185      # redis-server, for the proxy with shared state
PXR=18186      # this proxy with `redis:`
PXE=18187      # this proxy, for the embeddings step
EMB=18188      # the embeddings upstream
EMBEDDINGS=16  # concurrent 82 MB answers
say() { printf '== %s\n' "$*" >&2; }

# embeddings_rss BIN -> "<answers whole> <bytes per answer> <seconds> <peak RSS kB>"
embeddings_rss() {
  local dir
  dir=$(mktemp -d)
  cat >"$dir/base.yaml" <<YAML
host: 127.0.0.1
port: $PXE
logging: {level: warn}
routing: {timeout: 600}
instances:
  - {name: big, api_key: bench, api_base: 'http://127.0.0.1:$EMB', api_version: 2024-10-21, supported_models: [text-embedding-3-large]}
YAML
  python3 bench/loads.py embeddings "$1" "$dir" "$PXE" "$EMB" "$EMBEDDINGS"
  rm -rf "$dir"
}
# embeddings_row WHOLE BYTES SECONDS PEAK_KB -> the report's row
embeddings_row() {
  local peak_mb
  peak_mb=$(awk -v k="$4" 'BEGIN{ printf "%.1f", k/1024 }')
  echo "| $1 of $EMBEDDINGS concurrent embeddings answers of $(awk -v b="$2" 'BEGIN{ printf "%.1f", b/1e6 }') MB relayed whole (in $3 s): proxy peak RSS | $peak_mb MB | ≤ 100 MB | $(awk -v v="$peak_mb" 'BEGIN{ print (v+0 <= 100) ? "met" : "**missed**" }') |"
}
if [ "$only" = embeddings-rss ]; then
  # shellcheck disable=SC2046 # four numbers, split on purpose
  embeddings_row $(embeddings_rss "${BIN:-$(scripts/build-static.sh | awk '{print $1}')}")
  exit 0
fi

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} from Debian's packages"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq "${missing[@]}" >&2
}
need wrk curl python3 redis-server
# A leftover server on one of these ports would be measured in place of ours.
for port in $UP $NGX $PX $SLOW $((PX + 10)) $RDS $PXR $PXE $EMB 18189 18190 18191; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use on 127.0.0.1 (a leftover nginx or proxy?): stop it first" >&2; exit 1
  fi
done
NGINX_BIN=$(command -v nginx || true)
if [ -z "$NGINX_BIN" ]; then need nginx || true; NGINX_BIN=$(command -v nginx || true); fi
[ -n "$NGINX_BIN" ] || { echo "nginx could not be installed; this benchmark needs it as upstream and reference" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
main_shell=$BASHPID
cleanup() {
  # bash also runs an EXIT trap when a $(...) subshell ends: act only for the script.
  [ "$BASHPID" = "$main_shell" ] || return 0
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$tmp/nginx.pid" ] && kill "$(cat "$tmp/nginx.pid")" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  say "building the static binary"
  bin=$(scripts/build-static.sh | awk '{print $1}')
fi
size=$(stat -c %s "$bin")

# ---- the upstream and the nginx reference ------------------------------------------
json='{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
sse='data: {"choices":[{"index":0,"delta":{"content":"Hello"}}],"usage":null}\n\ndata: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}\n\ndata: [DONE]\n\n'
mkdir -p "$tmp/ngx/logs"
cat >"$tmp/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $tmp/nginx.pid;
error_log $tmp/ngx/logs/error.log crit;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream fast { server 127.0.0.1:$UP; keepalive 256; }
  server {
    listen 127.0.0.1:$UP;
    location ~ /chat/completions\$ {
      if (\$http_x_stream) { rewrite ^ /sse last; }
      # Below the +redis proxies' max_tpm (1e9), as Azure's counts are: each answer asks
      # for a window correction, a settlement, as in production.
      add_header x-ratelimit-remaining-tokens 999000000;
      add_header x-ratelimit-remaining-requests 1000000;
      default_type application/json;
      return 200 '$json';
    }
    location = /sse { default_type text/event-stream; return 200 '$(printf '%b' "$sse" | sed 's/$/\\n/' | tr -d '\n' | sed 's/\\n$//')'; }
  }
  server {
    listen 127.0.0.1:$NGX;
    location / {
      proxy_pass http://fast;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGINX
"$NGINX_BIN" -p "$tmp/ngx" -c "$tmp/nginx.conf" &
pids+=($!)
redis-server --port "$RDS" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" >/dev/null &
pids+=($!)

# ---- helpers ----------------------------------------------------------------------
# Every load comes from 127.0.0.1, one address: no cap per address (by default half of
# max_connections, which would refuse the crowd and the held streams past it).
config() {  # config DIR PORT UPSTREAM_PORT [server settings]
  mkdir -p "$1"
  cat >"$1/base.yaml" <<YAML
host: 127.0.0.1
port: $2
logging: {level: warn}
server: {max_connections_per_ip: 0${4:+, $4}}
instances:
  - {name: fast, api_key: bench, api_base: 'http://127.0.0.1:$3', api_version: 2024-10-21, supported_models: [gpt-4o]}
YAML
}
config "$tmp/cfg" "$PX" "$UP"
wait_http() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.02; done; return 1; }
body='{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
cat >"$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
LUA
declare -A url=(
  [direct]="http://127.0.0.1:$UP/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
  [nginx]="http://127.0.0.1:$NGX/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
)
to_ms() {  # wrk latency like 812.00us, 1.25ms, 2.00s
  awk -v v="$1" 'BEGIN{ n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{ if (NR%2) printf "%s", a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2 }'; }
# measure TARGET CONNS: one wrk point (after a second's warm-up), its req/s, p50 and p99
# appended to rps, p50 and p99 under "TARGET,CONNS".
declare -A rps p50 p99
measure() {
  local threads=$(( $2 < 2 ? 1 : 2 )) out
  wrk -t"$threads" -c"$2" -d1s -s "$tmp/post.lua" "${url[$1]}" >/dev/null 2>&1 || true
  out=$(wrk -t"$threads" -c"$2" -d"$DURATION" --latency -s "$tmp/post.lua" "${url[$1]}")
  if echo "$out" | grep -q "Non-2xx"; then echo "$1 at $2 connections: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
  rps[$1,$2]+=" $(echo "$out" | awk '/Requests\/sec/{print $2}')"
  p50[$1,$2]+=" $(to_ms "$(echo "$out" | awk '$1=="50%"{print $2}')")"
  p99[$1,$2]+=" $(to_ms "$(echo "$out" | awk '$1=="99%"{print $2}')")"
}
# Within-round comparisons (the same round's values, paired), then their median.
paired() {  # paired OP A B -> median over rounds of (A op B); A, B are "target,conns" keys
  local -a a b; read -ra a <<<"$2"; read -ra b <<<"$3"
  for i in "${!a[@]}"; do
    awk -v x="${a[$i]}" -v y="${b[$i]}" -v op="$1" 'BEGIN{ printf "%.3f ", (op == "/") ? x / y : x - y }'
  done | median
}
range() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{printf "%s–%s", lo, hi}'; }
per_round() {  # per_round OP A B -> the per-round values, for the range
  local -a a b; read -ra a <<<"$2"; read -ra b <<<"$3"
  for i in "${!a[@]}"; do
    awk -v x="${a[$i]}" -v y="${b[$i]}" -v op="$1" 'BEGIN{ printf "%.2f ", (op == "/") ? x / y : x - y }'
  done
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "-"; else printf "%.2f", a/b }'; }
minus() { awk -v a="$1" -v b="$2" 'BEGIN{ printf "%.3f", a-b }'; }
mb() { awk -v k="$1" 'BEGIN{ printf "%.1f", k/1024 }'; }
atmost() { awk -v v="$1" -v lim="$2" 'BEGIN{ print (v != "" && v+0 <= lim+0) ? "met" : "**missed**" }'; }
atleast() { awk -v v="$1" -v lim="$2" 'BEGIN{ print (v != "" && v+0 >= lim+0) ? "met" : "**missed**" }'; }
wait_http "http://127.0.0.1:$UP/openai/deployments/gpt-4o/chat/completions" && kill -0 "${pids[0]}" 2>/dev/null ||
  { echo "nginx did not start" >&2; cat "$tmp/ngx/logs/error.log" >&2; exit 1; }
for _ in $(seq 1 100); do redis-cli -p "$RDS" ping >/dev/null 2>&1 && break; sleep 0.05; done
if [ "$only" = builds ]; then
  # shellcheck source=bench/builds.sh
  . bench/builds.sh
  exit 0
fi

# ---- the proxy --------------------------------------------------------------------

startup_ms=$(python3 bench/loads.py startup "$bin" "$tmp/cfg" "$PX")
"$bin" --config-dir "$tmp/cfg" 2>>"$tmp/proxy.log" &
px_pid=$!
pids+=("$px_pid")
wait_http "http://127.0.0.1:$PX/health" || { echo "the proxy did not start" >&2; cat "$tmp/proxy.log" >&2; exit 1; }

# ---- half-sent heads from one address (alone: `scripts/bench.sh partial-heads`) ----------
partial_heads() {
  local opened still health_max chat_max
  read -r opened still health_max chat_max <<<"$(python3 bench/loads.py partial-heads "$PX" "$PARTIAL_HEADS")"
  say "$opened half-sent heads from one address ($still still open): /health max $health_max ms, chat max $chat_max ms"
  echo "| /health and a chat request, 20 each, with $opened half-sent heads opened from the same address ($still left open by the proxy), max | $health_max / $chat_max ms | ≤ 50 ms | $(awk -v a="$health_max" -v b="$chat_max" 'BEGIN{ print (a <= 50 && b <= 50) ? "met" : "**missed**" }') |"
}
if [ "$only" = partial-heads ]; then
  partial_heads
  exit 0
fi
# The same proxy with shared state in a Redis of its own, and a TPM window, so that each
# request is admitted in Redis and settled there (the upstream's remaining-token header,
# as Azure sends on every answer, asks for a settlement).
config "$tmp/cfg-shared" "$PXR" "$UP"
sed -i 's/supported_models: \[gpt-4o\]}/max_tpm: 1000000000, supported_models: [gpt-4o]}/' "$tmp/cfg-shared/base.yaml"
printf "redis: {url: 'redis://127.0.0.1:%s/0'}\n" "$RDS" >>"$tmp/cfg-shared/base.yaml"
"$bin" --config-dir "$tmp/cfg-shared" 2>>"$tmp/proxy-shared.log" &
pids+=($!)
wait_http "http://127.0.0.1:$PXR/health" && curl -s "http://127.0.0.1:$PXR/health" | grep -q '"shared_state":"shared"' ||
  { echo "the proxy with Redis did not start sharing" >&2; cat "$tmp/proxy-shared.log" >&2; exit 1; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
rss_idle=$(rss_kb "$px_pid")

# ---- throughput and latency, interleaved rounds -------------------------------------
url[proxy]="http://127.0.0.1:$PX/v1/chat/completions"
url[shared]="http://127.0.0.1:$PXR/v1/chat/completions"
rss_peak=$rss_idle
for round in $(seq 1 "$ROUNDS"); do
  for c in "${CONNS[@]}"; do
    for target in direct nginx proxy shared; do
      [ "$target" = shared ] && [ "$c" -ne 1 ] && [ "$c" -ne 16 ] && continue
      measure "$target" "$c"
      if [ "$target" = proxy ]; then
        r=$(rss_kb "$px_pid"); [ "$r" -gt "$rss_peak" ] && rss_peak=$r
      fi
    done
    say "round $round, $c connections: direct ${rps[direct,$c]##* }, nginx ${rps[nginx,$c]##* }, proxy ${rps[proxy,$c]##* } req/s"
  done
done
tput16=$(paired / "${rps[proxy,16]}" "${rps[nginx,16]}")
tput16_range=$(per_round / "${rps[proxy,16]}" "${rps[nginx,16]}" | range)
tput64=$(paired / "${rps[proxy,64]}" "${rps[nginx,64]}")
tput64_range=$(per_round / "${rps[proxy,64]}" "${rps[nginx,64]}" | range)
hold256=$(paired / "${rps[proxy,256]}" "${rps[proxy,16]}")
hold256_range=$(per_round / "${rps[proxy,256]}" "${rps[proxy,16]}" | range)
added_p50=$(paired - "${p50[proxy,16]}" "${p50[direct,16]}")
added_p99=$(paired - "${p99[proxy,16]}" "${p99[direct,16]}")
added_p50_1=$(paired - "${p50[proxy,1]}" "${p50[direct,1]}")
redis_p50_1=$(paired - "${p50[shared,1]}" "${p50[proxy,1]}")
redis_p99_1=$(paired - "${p99[shared,1]}" "${p99[proxy,1]}")
redis_p50_16=$(paired - "${p50[shared,16]}" "${p50[proxy,16]}")
redis_p99_16=$(paired - "${p99[shared,16]}" "${p99[proxy,16]}")
redis_tput16=$(paired / "${rps[shared,16]}" "${rps[proxy,16]}")
for key in "${!rps[@]}"; do
  rps[$key]=$(echo "${rps[$key]}" | median)
  p50[$key]=$(echo "${p50[$key]}" | median)
  p99[$key]=$(echo "${p99[$key]}" | median)
done

# ---- SSE time to first byte ---------------------------------------------------------
ttfb() {  # median time_starttransfer (ms) of 200 streamed requests; $1 url, $2 extra header
  for _ in $(seq 1 200); do
    curl -s -o /dev/null -w '%{time_starttransfer}\n' -X POST "$1" -H 'Content-Type: application/json' -H "$2" \
      -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  done | sort -n | awk '{a[NR]=$1} END{printf "%.3f", a[int((NR+1)/2)]*1000}'
}
for target in direct proxy; do  # the X-Stream header must reach nginx through the proxy
  curl -s -o /dev/null -w '%{content_type}' -X POST "${url[$target]}" -H 'Content-Type: application/json' \
    -H "X-Stream: 1" -d '{"model":"gpt-4o","stream":true,"messages":[]}' | grep -q '^text/event-stream' ||
    { echo "$target: the streamed request did not get an event stream" >&2; exit 1; }
done
ttfb_direct=$(ttfb "${url[direct]}" "X-Stream: 1")
ttfb_proxy=$(ttfb "${url[proxy]}" "X-Stream: 1")
say "SSE TTFB: direct $ttfb_direct ms, proxy $ttfb_proxy ms"

# ---- idle and slowloris connections ---------------------------------------------------
read -r idle_open slow_open crowd_p50 crowd_max <<<"$(python3 bench/loads.py crowd "$PX" "$IDLE" "$SLOWLORIS")"
rss_crowd=$(rss_kb "$px_pid")
say "$idle_open idle + $slow_open slowloris open: a request took $crowd_p50 ms (median), $crowd_max ms (max); RSS $rss_crowd kB"
kill "$px_pid"; wait "$px_pid" 2>/dev/null || true

# ---- held streams -----------------------------------------------------------------------
held() {  # held N -> "<started> <seconds> <rss kB>"
  config "$tmp/cfg-$1" "$((PX + 10))" "$SLOW" \
    "workers: $(( $1 + 100 )), max_connections: $(( $1 + 200 )), shutdown_grace_seconds: 0"
  python3 bench/loads.py held "$bin" "$tmp/cfg-$1" "$((PX + 10))" "$SLOW" "$1"
}
read -r streams_open streams_secs rss_streams <<<"$(held "$STREAMS")"
say "$streams_open streams held: RSS $rss_streams kB"
read -r many_open many_secs rss_many <<<"$(held "$MANY_STREAMS")"
say "$many_open streams held: all started in $many_secs s, RSS $rss_many kB"

# ---- big embeddings answers -------------------------------------------------------------
read -r emb_whole emb_bytes emb_secs emb_peak <<<"$(embeddings_rss "$bin")"
say "$emb_whole of $EMBEDDINGS embeddings answers of $emb_bytes bytes in $emb_secs s: peak RSS $emb_peak kB"

# ---- the report ----------------------------------------------------------------------
cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
mem=$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)
ttfb_over=$(minus "$ttfb_proxy" "$ttfb_direct")
size_mb=$(awk -v s="$size" 'BEGIN{printf "%.2f", s/1000000}')
report() {
  echo "# Benchmark results"
  echo
  echo "Measured by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d): $(nproc) cores ($cpu), $mem, $(uname -sr)."
  echo "Everything on one machine over loopback; load from \`wrk\`, $ROUNDS interleaved rounds of ${DURATION}"
  echo "per point, medians shown. The upstream is nginx answering a fixed chat completion; the proxy"
  echo "is the static binary with its default settings. The table shows each point's medians; the"
  echo "figures below it are medians of the ratios and differences measured within one round, so"
  echo "they need not equal the ratios of the table's medians."
  echo
  echo "| target | conns | req/s | p50 ms | p99 ms | req/s vs direct | req/s vs nginx proxy_pass |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for c in "${CONNS[@]}"; do
    for target in direct nginx proxy; do
      echo "| $target | $c | ${rps[$target,$c]} | ${p50[$target,$c]} | ${p99[$target,$c]} | $(ratio "${rps[$target,$c]}" "${rps[direct,$c]}") | $(ratio "${rps[$target,$c]}" "${rps[nginx,$c]}") |"
    done
  done
  echo
  echo "| figure | measured | target | |"
  echo "|---|---:|---:|---|"
  echo "| throughput at 16 conns, proxy / nginx proxy_pass (rounds: $tput16_range) | $tput16 | ≥ 0.50 | $(atleast "$tput16" 0.5) |"
  echo "| throughput at 64 conns, proxy / nginx proxy_pass (rounds: $tput64_range) | $tput64 | ≥ 0.50 | $(atleast "$tput64" 0.5) |"
  echo "| throughput at 256 conns / the proxy's own at 16 (rounds: $hold256_range) | $hold256 | ≥ 0.80 | $(atleast "$hold256" 0.8) |"
  echo "| added latency p50 at 16 conns (proxy − direct) | $added_p50 ms | ≤ 0.3 ms | $(atmost "$added_p50" 0.3) |"
  echo "| added latency p99 at 16 conns (proxy − direct) | $added_p99 ms | ≤ 2 ms | $(atmost "$added_p99" 2) |"
  echo "| added latency p50 at 1 conn (proxy − direct), no queueing | $added_p50_1 ms | | |"
  echo "| added latency of Redis on loopback (proxy with \`redis:\` − proxy), p50 / p99 at 1 conn | $redis_p50_1 / $redis_p99_1 ms | | |"
  echo "| added latency of Redis on loopback, p50 / p99 at 16 conns | $redis_p50_16 / $redis_p99_16 ms | | |"
  echo "| throughput at 16 conns, proxy with Redis / without | $redis_tput16 | | |"
  echo "| SSE time to first byte, median (direct → proxy) | $ttfb_direct → $ttfb_proxy ms (+$ttfb_over) | | |"
  echo "| a request with $idle_open idle + $slow_open slowloris connections open, max of 20 (median) | $crowd_max ms ($crowd_p50) | < 50 ms | $(atmost "$crowd_max" 50) |"
  echo "| RSS with those connections open | $(mb "$rss_crowd") MB | < 150 MB | $(atmost "$(mb "$rss_crowd")" 150) |"
  echo "| RSS idle | $(mb "$rss_idle") MB | ≤ 20 MB | $(atmost "$(mb "$rss_idle")" 20) |"
  echo "| RSS peak under load (up to 256 conns) | $(mb "$rss_peak") MB | | |"
  echo "| RSS holding $streams_open concurrent streams | $(mb "$rss_streams") MB | ≤ 100 MB | $(atmost "$(mb "$rss_streams")" 100) |"
  local limit_note=""
  [ "$MANY_STREAMS" -lt 10000 ] && limit_note=" (the most $(ulimit -Hn) descriptors allow; the target is for 10,000)"
  echo "| $many_open of $MANY_STREAMS streams started$limit_note, all within | $many_secs s | ≤ 10 s | $( [ "$many_open" = "$MANY_STREAMS" ] && atmost "$many_secs" 10 || echo '**missed**') |"
  echo "| RSS holding $many_open concurrent streams | $(mb "$rss_many") MB | ≤ 700 MB | $(atmost "$(mb "$rss_many")" 700) |"
  echo "| ... per stream | $(awk -v r="$rss_many" -v i="$rss_idle" -v n="$many_open" 'BEGIN{ printf "%.1f", (r - i) / n }') kB | ≤ 70 kB | $(atmost "$(awk -v r="$rss_many" -v i="$rss_idle" -v n="$many_open" 'BEGIN{ printf "%.1f", (r - i) / n }')" 70) |"
  embeddings_row "$emb_whole" "$emb_bytes" "$emb_secs" "$emb_peak"
  echo "| start-up to first served request (median of 5) | $startup_ms ms | ≤ 50 ms | $(atmost "$startup_ms" 50) |"
  echo "| static binary size | $size_mb MB | ≤ 6 MB | $(atmost "$size_mb" 6) |"
}
report
if $write; then
  # Sections after the report's own (from the next `## ` heading on) were measured by
  # other commands: they are kept.
  kept=$(awk '/^## /{found=1} found' bench/results.md 2>/dev/null || true)
  {
    report
    if [ -n "$kept" ]; then printf '\n%s\n' "$kept"; fi
  } >bench/results.md
  say "written to bench/results.md"
fi
