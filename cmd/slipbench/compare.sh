#!/usr/bin/env bash
# Measures slipway, distribution 2.8 (Debian's docker-registry) and a
# ceiling server with slipbench, one after the other on this machine, and
# prints slipway's ratios against the targets of issues 7 and 16, then the
# cache benchmarks at a million index entries (eviction pass, startup
# recovery, stats: time and peak heap).
#
#   bash cmd/slipbench/compare.sh                  # full sizes, ~12 minutes
#   bash cmd/slipbench/compare.sh --blob-size 64MiB --cold-size 16MiB \
#     --push-size 64MiB --pusher-size 16MiB --duration 2s   # a quick look
#
# The cold fill runs twice: with the upstream at loopback speed, where 32
# copies cannot leave faster than the machine serves warm reads, and over
# a 64 MiB/s upstream link (--upstream-link, about 540 Mbit/s), as from a site's internet
# connection. Extra arguments go to every `slipbench run`. Results land in
# $SLIPBENCH_OUT (default ./slipbench-out) as JSON, with the servers' logs.
# distribution runs in proxy mode for the read scenarios and in plain mode
# for the push scenario, since its proxy mode refuses pushes. Without
# docker-registry (and no root to install it) it is left out.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${SLIPBENCH_OUT:-$PWD/slipbench-out}
mkdir -p "$out"
export BIN="$out/bin"
go build -o "$BIN/slipway" ./cmd/slipway
go build -o "$BIN/slipbench" ./cmd/slipbench

if ! command -v docker-registry >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null ||
		echo "compare.sh: could not install docker-registry; distribution is left out" >&2
fi

# The servers' commands: each gets SLIPBENCH_LISTEN, SLIPBENCH_UPSTREAM and
# SLIPBENCH_DATA from slipbench and execs the server.
slipway='exec "$BIN/slipway" serve --listen "$SLIPBENCH_LISTEN" --upstream "$SLIPBENCH_UPSTREAM" --data-dir "$SLIPBENCH_DATA" --log-level warn'
ceiling='exec "$BIN/slipbench" ceiling --listen "$SLIPBENCH_LISTEN" --upstream "$SLIPBENCH_UPSTREAM" --dir "$SLIPBENCH_DATA"'
# distribution's config as Debian ships it (in-memory blob descriptor
# cache), minus auth, with the access log off as slipway's is.
distribution_config='cat > "$SLIPBENCH_DATA/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $SLIPBENCH_DATA/storage
  delete:
    enabled: true
http:
  addr: $SLIPBENCH_LISTEN
YML
'
distribution_proxy="$distribution_config"'printf "proxy:\n  remoteurl: %s\n" "$SLIPBENCH_UPSTREAM" >> "$SLIPBENCH_DATA/config.yml"
exec docker-registry serve "$SLIPBENCH_DATA/config.yml"'
distribution_plain="$distribution_config"'exec docker-registry serve "$SLIPBENCH_DATA/config.yml"'

# The warm scenarios run twice for every server, and compare keeps each
# one's best: warm reads on a small machine swing by 10% from one minute to
# the next.
warm=(--scenarios warm-blob,warm-manifest)
results=("$out/slipway.json" "$out/slipway-warm.json")
"$BIN/slipbench" run --name ceiling "${warm[@]}" \
	--server "$ceiling" --json "$out/ceiling.json" --server-log "$out/ceiling.log" "$@"
"$BIN/slipbench" run --name slipway "${warm[@]}" \
	--server "$slipway" --json "$out/slipway-warm.json" --server-log "$out/slipway.log" "$@"
if command -v docker-registry >/dev/null 2>&1; then
	"$BIN/slipbench" run --name distribution --upstream-link 64MiB --server "$distribution_proxy" --push-server "$distribution_plain" \
		--json "$out/distribution.json" --server-log "$out/distribution.log" "$@"
	results+=("$out/distribution.json")
fi
"$BIN/slipbench" run --name slipway --upstream-link 64MiB --server "$slipway" \
	--json "$out/slipway.json" --server-log "$out/slipway.log" "$@"
if command -v docker-registry >/dev/null 2>&1; then
	"$BIN/slipbench" run --name distribution "${warm[@]}" --server "$distribution_proxy" \
		--json "$out/distribution-warm.json" --server-log "$out/distribution.log" "$@"
	results+=("$out/distribution-warm.json")
fi
"$BIN/slipbench" run --name ceiling "${warm[@]}" \
	--server "$ceiling" --json "$out/ceiling-2.json" --server-log "$out/ceiling.log" "$@"
results+=("$out/ceiling.json" "$out/ceiling-2.json")

echo
"$BIN/slipbench" compare "${results[@]}"

# The index at scale: a million entries (SLIPWAY_BENCH_ENTRIES), one pass
# each. Targets: the eviction pass within 2 s, and no pass above 64 MiB of
# peak heap (peak-heap-MiB).
echo
echo "cache at ${SLIPWAY_BENCH_ENTRIES:=1000000} index entries:"
SLIPWAY_BENCH_ENTRIES=$SLIPWAY_BENCH_ENTRIES go test -run '^$' -bench 'EvictionPass|StartupRecovery|Stats' -benchtime 1x ./cache |
	grep -E '^Benchmark'
