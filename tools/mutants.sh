#!/usr/bin/env bash
# Mutation testing of the pure rule modules against their own unit tests (cargo-mutants).
# Outside CI's time budget: on 2 cores a full run takes about an hour. See TESTING.md.
#   tools/mutants.sh [cargo-mutants options...]    e.g. tools/mutants.sh --list
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null; then
    cargo install --locked --quiet cargo-mutants \
        || { echo "tools/mutants.sh: cargo install --locked cargo-mutants failed" >&2; exit 1; }
fi

# The rule tables: protocol rules and the notify message, the tunnel table and lifecycle,
# the stream table, backoff, MQTT subscriptions, the service map.
RULES=(
    src/protocol/mod.rs
    src/protocol/codec.rs
    src/protocol/message.rs
    src/protocol/notify.rs
    src/tunnels/table.rs
    src/tunnels/mod.rs
    src/bridge/streams.rs
    src/backoff.rs
    src/mqtt/subscriptions.rs
    src/services.rs
)
# Files given as --file FILE replace the list.
args=()
case " $* " in
    *" --file "*) ;;
    *) for f in "${RULES[@]}"; do args+=(--file "$f"); done ;;
esac
# Unit tests only: a rule must be pinned by its own test, not by an end-to-end one.
# The mutants profile (Cargo.toml): the agent unoptimised, one quick rebuild per mutant.
exec cargo mutants "${args[@]}" --profile mutants --cargo-test-arg=--lib "$@"
