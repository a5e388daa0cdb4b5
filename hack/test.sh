#!/usr/bin/env bash
# `make test`: bring up the real services (reusing any that already run), build, run the whole
# workspace's tests, and stop exactly the services this run started.
source "$(dirname "$0")/lib.sh"
cd "$QP_ROOT"

need cargo "install Rust with rustup (https://rustup.rs)"

t0=$SECONDS
services_up

t1=$SECONDS
log "lint: rustfmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log "building binaries"
cargo build --workspace --bins
export QP_ENV_FILE
# Integration tests start worker processes and share two cores; a bounded number of test threads
# keeps timing-sensitive assertions (latencies, reaction times) meaningful.
RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}" cargo test --workspace --no-fail-fast
log "tests passed in $((SECONDS - t1))s (services: $((t1 - t0))s)"
