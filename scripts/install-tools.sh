#!/usr/bin/env bash
# Installs the cargo tools `make check` runs, at pinned versions, if missing or at another
# version. Idempotent and quiet when everything is present.
#
# cargo-deny (bans, licenses, sources against deny.toml): built from source with the locked
# dependencies once per machine: 10 min wall (4m45s of CPU) on a busy 2-core machine.
set -euo pipefail

CARGO_DENY_VERSION=0.20.2

cargo=${CARGO:-cargo}
have=$("$cargo" deny --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$CARGO_DENY_VERSION" ]; then
    echo "install-tools: installing cargo-deny $CARGO_DENY_VERSION${have:+ (found $have)}"
    "$cargo" install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION"
fi
