#!/usr/bin/env bash
# Two agent builds as the destination of the same 1-way push, in one run: alternating, best
# of 3, CPU per GiB of each and the ratio of the bests, and the median of each run's own
# ratio. Absolute figures move 2x between days on shared machines; only the ratios measured
# here mean anything.
#   bench/compare.sh OLD_BIN NEW_BIN [MiB]     (RUNS=3, SOURCE_BIN=NEW_BIN by default,
#                                              CONNS=1: connections pushing at once,
#                                              DEMO_REFRAME=1: messages cut at random,
#                                              ROLE=source: compare the two as the source,
#                                              with DEST_BIN=NEW_BIN as the destination)
# The push: CONNS clients write MiB in all into the source local-proxy, the emulator delivers one tunnel
# frame per websocket message (as the service does with a localproxy source), the destination
# writes it to a local sink that only reads. CPU = user+sys from the first byte to the last.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: [RUNS=3] [CONNS=1] [SOURCE_BIN=NEW_BIN] bench/compare.sh OLD_BIN NEW_BIN [MiB]" >&2; exit 2; }
# Paths as the caller gave them, before moving to the repository.
old="$(realpath "$1")"; new="$(realpath "$2")"; mib="${3:-512}"; runs="${RUNS:-3}"; conns="${CONNS:-1}"
source_bin="$(realpath "${SOURCE_BIN:-$2}")"
dest_bin="$(realpath "${DEST_BIN:-$2}")"
role="${ROLE:-destination}"
case "$role" in destination|source) ;; *) echo "compare: ROLE is destination or source, not '$role'" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
[ "$runs" -ge 1 ] || { echo "compare: RUNS must be at least 1" >&2; exit 2; }
# local-proxy accepts 128 connections per tunnel by default.
[[ "$conns" =~ ^[1-9][0-9]*$ ]] && [ "$conns" -le 128 ] \
    || { echo "compare: CONNS must be a number from 1 to 128, not '$conns'" >&2; exit 2; }
demo=target/release/securetunnel-demo
cargo build --locked --release -p securetunnel-emulator --bin securetunnel-demo >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
best() { sort -g | head -n1; }
# Field $2 of what matches $1 in the demo's line $out; a missing one stops the comparison.
field() { grep -o "$1" <<< "$out" | awk "{print \$$2}" | grep . \
    || { echo "compare: no '$1' in the demo's line: $out" >&2; exit 1; }; }
declare -A dest src rate
for i in $(seq "$runs"); do
    # Alternate which goes first, so drift during a run hits both alike.
    order="old new"; [ $((i % 2)) -eq 0 ] && order="new old"
    for which in $order; do
        bin="${!which}"
        agent_bin="$bin"; src_bin="$source_bin"
        [ "$role" = source ] && { agent_bin="$dest_bin"; src_bin="$bin"; }
        out="$(SECURETUNNEL_DEMO_AGENT="$agent_bin" SECURETUNNEL_DEMO_SOURCE="$src_bin" "$demo" push "$mib" "$conns" 2>"$log" | grep '^push')" \
            || { echo "compare: run $i ($which: $bin) failed:" >&2; tail -n 20 "$log" >&2; exit 1; }
        echo "compare: run $i $which: $out" >&2
        # The compared role's CPU goes to `dest`, the other end's to `src`.
        if [ "$role" = source ]; then
            dest[$which]+="$(field 'source [0-9.]*' 2) "
            src[$which]+="$(field 'destination [0-9.]*' 2) "
        else
            dest[$which]+="$(field 'destination [0-9.]*' 2) "
            src[$which]+="$(field 'source [0-9.]*' 2) "
        fi
        rate[$which]+="$(field '[0-9.]* MiB/s' 1) "
    done
done
o="$(tr ' ' '\n' <<< "${dest[old]}" | grep . | best)"
n="$(tr ' ' '\n' <<< "${dest[new]}" | grep . | best)"
s="$(tr ' ' '\n' <<< "${src[new]}" | grep . | best)"
printf '%s CPU per GiB, %s MiB 1-way push, best of %s: OLD %s s/GiB, NEW %s s/GiB, NEW/OLD %s\n' \
    "$role" "$mib" "$runs" "$o" "$n" "$(awk -v a="$n" -v b="$o" 'BEGIN{ if (b > 0) printf "%.2f", a/b; else print "n/a" }')"
# Each run measures both back to back, so its own ratio shares the machine's phase; the
# median of those is less at the mercy of one lucky run than the ratio of the bests.
med="$(paste -d' ' <(tr ' ' '\n' <<< "${dest[old]}" | grep .) <(tr ' ' '\n' <<< "${dest[new]}" | grep .) \
    | awk '$1 > 0 { print $2 / $1 }' | sort -g | awk '{ r[NR] = $1 } END { if (NR) printf "%.2f", (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2; else print "n/a" }')"
printf 'median of the %s runs'"'"' own NEW/OLD ratios: %s\n' "$runs" "$med"
other=source; other_bin="$source_bin"
[ "$role" = source ] && { other=destination; other_bin="$dest_bin"; }
printf 'the other end (%s, %s) CPU per GiB: %s s/GiB\n' "$other" "$other_bin" "$s"
ro="$(tr ' ' '\n' <<< "${rate[old]}" | grep . | sort -g | tail -n1)"
rn="$(tr ' ' '\n' <<< "${rate[new]}" | grep . | sort -g | tail -n1)"
printf 'throughput over %s connection(s), best of %s: OLD %s MiB/s, NEW %s MiB/s\n' "$conns" "$runs" "$ro" "$rn"
