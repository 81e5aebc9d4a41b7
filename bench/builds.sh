# Sourced by scripts/bench.sh for `scripts/bench.sh builds`, once nginx (the upstream
# and the proxy_pass reference) and redis-server run: the same source built two ways,
# the glibc release build (what the tests run) and the static binary (what users
# deploy), against nginx proxy_pass in one run.
#   1. wrk at 16, 64 and 256 connections, ROUNDS interleaved rounds (medians, and the
#      ratios within a round); at 16 also direct and the static binary with `redis:`;
#   2. oha at fixed rates (RATES, 16 connections, 10 s, corrected for coordinated
#      omission), TAIL_RUNS runs: p50 / p99 / p99.9.
# BEFORE=path/to/an/older/static/binary adds it as a column (before and after in one run).
# Uses from bench.sh: say, config, wait_http, to_ms, median, paired, per_round, range,
# ratio, atmost, atleast, tmp, bin (the static binary), url, the ports and post.lua.

if [ -n "${GLIBC_BIN:-}" ]; then
  glibc_bin=$GLIBC_BIN
else
  say "building the glibc release binary"
  cargo build --release --locked >&2
  glibc_bin=${CARGO_TARGET_DIR:-target}/release/azure-openai-proxy
fi
if ! command -v oha >/dev/null; then
  say "installing oha (a load generator with fixed rates) with cargo install"
  cargo install --locked oha >&2
fi
RATES=${RATES:-5000 15000}
TAIL_RUNS=${TAIL_RUNS:-3}

# One proxy per build on a port of its own, and the static (and older) one with Redis.
builds=(glibc static)
declare -A port=([glibc]=18189 [static]=$PX [before]=18190 [static+redis]=$PXR [before+redis]=18191)
declare -A exe=([glibc]=$glibc_bin [static]=$bin [static+redis]=$bin)
if [ -n "${BEFORE:-}" ]; then
  builds+=(before)
  exe[before]=$BEFORE
  exe[before+redis]=$BEFORE
fi
shared_targets=(static+redis)
[ -n "${BEFORE:-}" ] && shared_targets+=(before+redis)
for target in "${builds[@]}" "${shared_targets[@]}"; do
  config "$tmp/cfg-$target" "${port[$target]}" "$UP"
  if [[ $target == *+redis ]]; then
    sed -i 's/supported_models: \[gpt-4o\]}/max_tpm: 1000000000, supported_models: [gpt-4o]}/' "$tmp/cfg-$target/base.yaml"
    printf "redis: {url: 'redis://127.0.0.1:%s/0', prefix: '%s'}\n" "$RDS" "$target" >>"$tmp/cfg-$target/base.yaml"
  fi
  "${exe[$target]}" --config-dir "$tmp/cfg-$target" 2>>"$tmp/proxy-$target.log" &
  pids+=($!)
  wait_http "http://127.0.0.1:${port[$target]}/health" || { echo "$target did not start" >&2; cat "$tmp/proxy-$target.log" >&2; exit 1; }
  url[$target]="http://127.0.0.1:${port[$target]}/v1/chat/completions"
done
for target in "${shared_targets[@]}"; do
  curl -s "http://127.0.0.1:${port[$target]}/health" | grep -q '"shared_state":"shared"' ||
    { echo "$target is not sharing its state in Redis" >&2; cat "$tmp/proxy-$target.log" >&2; exit 1; }
done

# ---- saturation: wrk, interleaved rounds ---------------------------------------------
declare -A rps p50 p99
for round in $(seq 1 "$ROUNDS"); do
  for c in 16 64 256; do
    targets=(nginx "${builds[@]}")
    [ "$c" -eq 16 ] && targets=(direct "${targets[@]}" "${shared_targets[@]}")
    for target in "${targets[@]}"; do
      wrk -t2 -c"$c" -d1s -s "$tmp/post.lua" "${url[$target]}" >/dev/null 2>&1 || true  # warm-up
      out=$(wrk -t2 -c"$c" -d"$DURATION" --latency -s "$tmp/post.lua" "${url[$target]}")
      if echo "$out" | grep -q "Non-2xx"; then echo "$target at $c connections: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
      rps[$target,$c]+=" $(echo "$out" | awk '/Requests\/sec/{print $2}')"
      p50[$target,$c]+=" $(to_ms "$(echo "$out" | awk '$1=="50%"{print $2}')")"
      p99[$target,$c]+=" $(to_ms "$(echo "$out" | awk '$1=="99%"{print $2}')")"
    done
    say "round $round, $c connections: nginx ${rps[nginx,$c]##* }, glibc ${rps[glibc,$c]##* }, static ${rps[static,$c]##* } req/s"
  done
done

# ---- fixed rates: oha, corrected for coordinated omission -----------------------------
# oha_point URL RATE -> "p50 p99 p99.9" in ms
oha_point() {
  oha -z 10s -c 16 -q "$2" --latency-correction --no-tui --output-format json -m POST \
    -H 'Content-Type: application/json' -d "$body" "$1" |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
ok = r["statusCodeDistribution"]
if set(ok) - {"200"}:
    sys.exit(f"answers other than 200: {ok}")
p = r["latencyPercentiles"]
print(" ".join(f"{p[k] * 1000:.2f}" for k in ("p50", "p99", "p99.9")))'
}
declare -A tail
for run in $(seq 1 "$TAIL_RUNS"); do
  for rate in $RATES; do
    for target in direct nginx "${builds[@]}"; do
      tail[$run,$rate,$target]=$(oha_point "${url[$target]}" "$rate")
    done
    say "fixed $rate req/s, run $run: p50/p99/p99.9 nginx ${tail[$run,$rate,nginx]}, glibc ${tail[$run,$rate,glibc]}, static ${tail[$run,$rate,static]} ms"
  done
done

# ---- the report --------------------------------------------------------------------
vs() {  # vs A B CONNS TARGET -> a figure row: A / B at CONNS connections, at least TARGET
  local m; m=$(paired / "${rps[$1,$3]}" "${rps[$2,$3]}")
  echo "| throughput at $3 conns, $1 / $2 (rounds: $(per_round / "${rps[$1,$3]}" "${rps[$2,$3]}" | range)) | $m | ≥ $4 | $(atleast "$m" "$4") |"
}
builds_report() {
  local c target m
  echo "## The static binary, the glibc build and nginx"
  echo
  echo "Measured by \`scripts/bench.sh builds\` on $(date -u +%Y-%m-%d): $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)), $(uname -sr)."
  echo "The same source built two ways: \`glibc\` is \`cargo build --release\` (what the tests run),"
  echo "\`static\` is \`scripts/build-static.sh\` (musl, what users deploy)$([ -n "${BEFORE:-}" ] && echo "; \`before\` is an older static binary given as BEFORE")."
  echo "wrk: $ROUNDS interleaved rounds of $DURATION per point, medians; the figures below are medians"
  echo "of ratios within a round. \`+redis\`: the same binary with \`redis:\` (a redis-server on"
  echo "loopback) and a TPM limit, so each request is admitted in Redis and settled there."
  echo
  echo "| conns | nginx proxy_pass | $(printf '%s | ' "${builds[@]}")static / glibc | static / nginx |"
  echo "|---:|---:|$(printf -- '---:|%.0s' "${builds[@]}")---:|---:|"
  for c in 16 64 256; do
    for target in nginx "${builds[@]}"; do rps[$target,$c,m]=$(echo "${rps[$target,$c]}" | median); done
    echo "| $c | ${rps[nginx,$c,m]} | $(for target in "${builds[@]}"; do printf '%s | ' "${rps[$target,$c,m]}"; done)$(ratio "${rps[static,$c,m]}" "${rps[glibc,$c,m]}") | $(ratio "${rps[static,$c,m]}" "${rps[nginx,$c,m]}") |"
  done
  echo
  echo "| at 16 conns | req/s | p50 ms | p99 ms |"
  echo "|---|---:|---:|---:|"
  for target in direct nginx "${builds[@]}" "${shared_targets[@]}"; do
    echo "| $target | $(echo "${rps[$target,16]}" | median) | $(echo "${p50[$target,16]}" | median) | $(echo "${p99[$target,16]}" | median) |"
  done
  echo
  echo "| figure | measured | target | |"
  echo "|---|---:|---:|---|"
  vs static glibc 16 0.9
  vs static glibc 64 0.9
  vs static nginx 16 0.7
  vs static nginx 64 0.7
  m=$(paired / "${rps[static,256]}" "${rps[static,16]}")
  echo "| throughput at 256 conns / the static binary's own at 16 (rounds: $(per_round / "${rps[static,256]}" "${rps[static,16]}" | range)) | $m | ≥ 0.8 | $(atleast "$m" 0.8) |"
  m=$(paired / "${p99[static,16]}" "${p99[nginx,16]}")
  echo "| p99 at 16 conns (saturation), static / nginx | $m | ≤ 3 | $(atmost "$m" 3) |"
  m=$(paired - "${p50[static,16]}" "${p50[direct,16]}")
  echo "| p50 added at 16 conns (saturation), static − direct | $m ms | ≤ 0.3 ms | $(atmost "$m" 0.3) |"
  vs static+redis static 16 0.8
  m=$(paired - "${p50[static+redis,16]}" "${p50[static,16]}")
  echo "| p50 added by Redis at 16 conns | $m ms | ≤ 0.3 ms | $(atmost "$m" 0.3) |"
  if [ -n "${BEFORE:-}" ]; then
    for c in 16 64 256; do
      m=$(paired / "${rps[static,$c]}" "${rps[before,$c]}")
      echo "| throughput at $c conns, static / before (rounds: $(per_round / "${rps[static,$c]}" "${rps[before,$c]}" | range)) | $m | | |"
    done
    m=$(paired / "${rps[static+redis,16]}" "${rps[before+redis,16]}")
    echo "| throughput at 16 conns with Redis, static / before | $m | | |"
  fi
  echo
  echo "Fixed rates (oha, 16 connections, 10 s, \`--latency-correction\`), p50 / p99 / p99.9 in ms:"
  echo
  echo "| run | req/s | direct | nginx proxy_pass | $(printf '%s | ' "${builds[@]}")static p99 / nginx p99 |"
  echo "|---:|---:|---|---|$(printf -- '---|%.0s' "${builds[@]}")---:|"
  local all=met run rate r
  for run in $(seq 1 "$TAIL_RUNS"); do
    for rate in $RATES; do
      r=$(awk -v s="${tail[$run,$rate,static]}" -v n="${tail[$run,$rate,nginx]}" 'BEGIN{ split(s, a, " "); split(n, b, " "); printf "%.2f", a[2] / b[2] }')
      [ "$rate" = 15000 ] && [ "$(atmost "$r" 2)" != met ] && all="**missed**"
      echo "| $run | $rate | $(for target in direct nginx "${builds[@]}"; do printf '%s | ' "${tail[$run,$rate,$target]// / \/ }"; done)$r |"
    done
  done
  echo
  echo "| figure | measured | target | |"
  echo "|---|---:|---:|---|"
  echo "| at 15,000 req/s, static p99 / nginx p99, in each of $TAIL_RUNS runs | see above | ≤ 2 | $all |"
}
builds_report
if $write; then
  # Replaces this section of bench/results.md (or adds it), keeping the rest.
  section=$(builds_report)
  python3 - "$section" <<'PY'
import re, sys
path, section = "bench/results.md", sys.argv[1].rstrip("\n") + "\n"
text = open(path).read()
heading = section.splitlines()[0]
start = text.find(heading)
if start < 0:
    text = text.rstrip("\n") + "\n\n" + section
else:
    nxt = re.search(r"^## ", text[start + len(heading):], re.M)
    end = start + len(heading) + nxt.start() if nxt else len(text)
    text = text[:start] + section + ("\n" if nxt else "") + text[end:]
open(path, "w").write(text)
PY
  say "written to bench/results.md"
fi
