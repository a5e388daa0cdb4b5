#!/usr/bin/env bash
# `make bench`: bring up the real services (reusing any that already run), build the release
# binaries, run the benchmark driver, and stop exactly the services this run started.
#
#   bash hack/bench.sh [group...]    e.g. `bash hack/bench.sh worker`
#
# stdout carries the figures, one `name value unit` line each (see BENCHMARKS.md), then a
# summary table of every figure, its goal and met / not met, as `# ` comment lines; everything
# else (service start-up, cargo, progress) goes to stderr.
source "$(dirname "$0")/lib.sh"
cd "$QP_ROOT"

need cargo "install Rust with rustup (https://rustup.rs)"
services_up
# Installed by `services_up` on a new machine; the worker benchmark starts a private one.
need redis-server "apt-get install redis-server"
# The yardsticks (vegeta, kcat): installed once, cached by version.
eval "$(bash "$QP_ROOT/hack/bench-tools.sh")"

log "building release binaries"
cargo build --release --workspace --bins >&2
export QP_ENV_FILE
export QP_BIN_DIR="$QP_ROOT/target/release"
log "load before the benchmarks: $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min, $(nproc) cores)"
t1=$SECONDS
cargo run -q --release -p qp-tests --bin qp-bench -- "$@"
log "benchmarks done in $((SECONDS - t1))s"
