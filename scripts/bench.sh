#!/usr/bin/env bash
# Measures the proxy against references in one run and writes bench/results.md:
#   (a) a fast upstream directly (nginx answering a fixed Azure-like JSON/SSE body),
#   (b) this proxy in front of it, (c) nginx proxy_pass in front of it;
# requests/s and latency p50/p99 at 1, 16, 64 and 256 connections (wrk), SSE
# time-to-first-byte overhead, RSS idle / under load / holding 1,000 streams,
# start-up time to the first served request, and the static binary's size.
#
#   scripts/bench.sh                 # DURATION=5s per load point by default
#   DURATION=10s scripts/bench.sh
#
# Installs nginx, wrk and musl-tools from Debian's packages when missing. Everything
# listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
CONNS=(1 16 64 256)
STREAMS=${STREAMS:-1000}
UP=18181       # the fast upstream (nginx)
NGX=18182      # nginx proxy_pass
PX=18183       # this proxy
SLOW=18184     # a slow SSE upstream for the held-streams test
say() { printf '== %s\n' "$*" >&2; }

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} from Debian's packages"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq "${missing[@]}" >&2
}
need wrk curl python3
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

say "building the static binary"
bin=$(scripts/build-static.sh | awk '{print $1}')
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

# ---- the proxy --------------------------------------------------------------------
mkdir -p "$tmp/cfg"
cat >"$tmp/cfg/base.yaml" <<YAML
host: 127.0.0.1
port: $PX
logging: {level: warn}
server: {workers: 256}   # the default
instances:
  - {name: fast, api_key: bench, api_base: 'http://127.0.0.1:$UP', api_version: 2024-10-21, supported_models: [gpt-4o]}
YAML
wait_http() { for _ in $(seq 1 200); do curl -sf -o /dev/null "$1" && return 0; sleep 0.02; done; return 1; }

# Start-up time to the first served request, 5 runs (median), before the long-lived proxy.
startup_ms=$(python3 - "$bin" "$tmp/cfg" "$PX" <<'PY'
import statistics, subprocess, sys, time, urllib.request
binary, cfg, port = sys.argv[1], sys.argv[2], sys.argv[3]
runs = []
for _ in range(5):
    t = time.perf_counter()
    p = subprocess.Popen([binary, "--config-dir", cfg], stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            break
        except Exception:
            time.sleep(0.0005)
    runs.append((time.perf_counter() - t) * 1000)
    p.terminate(); p.wait()
print(f"{statistics.median(runs):.1f}")
PY
)

"$bin" --config-dir "$tmp/cfg" 2>>"$tmp/proxy.log" &
px_pid=$!
pids+=("$px_pid")
wait_http "http://127.0.0.1:$UP/openai/deployments/gpt-4o/chat/completions" || { echo "nginx did not start" >&2; exit 1; }
wait_http "http://127.0.0.1:$PX/health" || { echo "the proxy did not start" >&2; cat "$tmp/proxy.log" >&2; exit 1; }
rss_kb() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
rss_idle=$(rss_kb "$px_pid")

# ---- throughput and latency -------------------------------------------------------
body='{"model":"gpt-4o","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
cat >"$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["Content-Type"] = "application/json"
LUA
declare -A url=(
  [direct]="http://127.0.0.1:$UP/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
  [proxy]="http://127.0.0.1:$PX/v1/chat/completions"
  [nginx]="http://127.0.0.1:$NGX/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
)
to_ms() {  # wrk latency like 812.00us, 1.25ms, 2.00s
  awk -v v="$1" 'BEGIN{ n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}
declare -A rps p50 p99
rss_peak=$rss_idle
for c in "${CONNS[@]}"; do
  for target in direct proxy nginx; do
    threads=$(( c < 2 ? 1 : 2 ))
    wrk -t"$threads" -c"$c" -d1s -s "$tmp/post.lua" "${url[$target]}" >/dev/null 2>&1 || true  # warm-up
    if [ "$target" = proxy ]; then
      ( while kill -0 "$px_pid" 2>/dev/null; do rss_kb "$px_pid"; sleep 0.1; done ) >"$tmp/rss.$c" &
      sampler=$!
    fi
    out=$(wrk -t"$threads" -c"$c" -d"$DURATION" --latency -s "$tmp/post.lua" "${url[$target]}")
    [ "$target" = proxy ] && { kill "$sampler" 2>/dev/null || true; peak=$(sort -n "$tmp/rss.$c" | tail -1); [ "${peak:-0}" -gt "$rss_peak" ] && rss_peak=$peak; }
    if echo "$out" | grep -q "Non-2xx"; then echo "$target at $c connections: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
    rps[$target,$c]=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    p50[$target,$c]=$(to_ms "$(echo "$out" | awk '$1=="50%"{print $2}')")
    p99[$target,$c]=$(to_ms "$(echo "$out" | awk '$1=="99%"{print $2}')")
    say "$target c=$c: ${rps[$target,$c]} req/s, p50 ${p50[$target,$c]} ms, p99 ${p99[$target,$c]} ms"
  done
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

# ---- 1,000 streams held open at once -------------------------------------------------
mkdir -p "$tmp/cfg2"
sed -e "s/port: $PX/port: $((PX + 10))/" -e "s/workers: 256/workers: $((STREAMS + 100))/" \
    -e "s#http://127.0.0.1:$UP#http://127.0.0.1:$SLOW#" "$tmp/cfg/base.yaml" >"$tmp/cfg2/base.yaml"
held=$(python3 - "$bin" "$tmp/cfg2" "$((PX + 10))" "$SLOW" "$STREAMS" <<'PY'
import asyncio, subprocess, sys, time, urllib.request
binary, cfg, port, slow, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

async def upstream(reader, writer):
    # Azure-like SSE that keeps the stream open: an event every second for 30 s.
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(30):
            ev = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
            writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            await writer.drain()
            await asyncio.sleep(1)
    except BaseException:  # includes the cancellation at the end: the stream just stops
        pass
    writer.close()

async def client(opened):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"gpt-4o","stream":true,"messages":[]}'
    w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await w.drain()
    await r.readuntil(b"data:")
    opened.append(1)
    return w

def rss(pid):
    return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])

async def main():
    server = await asyncio.start_server(upstream, "127.0.0.1", slow, backlog=4096)
    proxy = subprocess.Popen([binary, "--config-dir", cfg], stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read(); break
        except Exception:
            await asyncio.sleep(0.01)
    opened = []
    writers = []
    for i in range(0, n, 100):  # open in batches so the listen backlog keeps up
        writers += await asyncio.gather(*[client(opened) for _ in range(min(100, n - i))])
    await asyncio.sleep(1)
    held = rss(proxy.pid)
    print(f"{len(opened)} {held}")
    for w in writers:
        w.close()
    proxy.terminate(); proxy.wait()
    server.close()

asyncio.run(main())
PY
)
streams_open=${held% *}
rss_streams=${held#* }
say "$streams_open streams held: RSS $rss_streams kB"

# ---- the report ----------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0 == 0) print "-"; else printf "%.2f", a/b }'; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{ printf "%.3f", a-b }'; }
mb() { awk -v k="$1" 'BEGIN{ printf "%.1f", k/1024 }'; }
cpu=$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)
mem=$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)
added_p50=$(sub "${p50[proxy,16]}" "${p50[direct,16]}")
added_p99=$(sub "${p99[proxy,16]}" "${p99[direct,16]}")
tput64=$(ratio "${rps[proxy,64]}" "${rps[nginx,64]}")
ttfb_over=$(sub "$ttfb_proxy" "$ttfb_direct")
check() { awk -v v="$1" -v lim="$2" 'BEGIN{ print (v+0 <= lim+0) ? "met" : "**missed**" }'; }
check_min() { awk -v v="$1" -v lim="$2" 'BEGIN{ print (v+0 >= lim+0) ? "met" : "**missed**" }'; }
mkdir -p bench
{
  echo "# Benchmark results"
  echo
  echo "Measured by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d): $(nproc) cores ($cpu), $mem, $(uname -sr)."
  echo "Everything on one machine over loopback, load from \`wrk\` (${DURATION} per point),"
  echo "the upstream is nginx answering a fixed chat completion; the proxy is the static binary."
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
  echo "| added latency p50 at 16 conns (proxy − direct) | $added_p50 ms | ≤ 0.3 ms | $(check "$added_p50" 0.3) |"
  echo "| added latency p99 at 16 conns (proxy − direct) | $added_p99 ms | ≤ 2 ms | $(check "$added_p99" 2) |"
  echo "| throughput at 64 conns, proxy / nginx proxy_pass | $tput64 | ≥ 0.50 | $(check_min "$tput64" 0.5) |"
  echo "| SSE time to first byte, median (direct → proxy) | $ttfb_direct → $ttfb_proxy ms (+$ttfb_over) | | |"
  echo "| RSS idle | $(mb "$rss_idle") MB | ≤ 20 MB | $(check "$(mb "$rss_idle")" 20) |"
  echo "| RSS peak under load (up to 256 conns) | $(mb "$rss_peak") MB | | |"
  echo "| RSS holding $streams_open concurrent streams (workers $((STREAMS + 100))) | $(mb "$rss_streams") MB | ≤ 100 MB | $(check "$(mb "$rss_streams")" 100) |"
  echo "| start-up to first served request (median of 5) | $startup_ms ms | ≤ 50 ms | $(check "$startup_ms" 50) |"
  echo "| static binary size | $(awk -v s="$size" 'BEGIN{printf "%.2f", s/1048576}') MiB | ≤ 6 MB | $(check "$(awk -v s="$size" 'BEGIN{printf "%.2f", s/1000000}')" 6) |"
} >bench/results.md
cat bench/results.md
