#!/usr/bin/env bash
# `make test`: lint and run every crate's unit tests (no service needed, so none is started for
# them), then bring up the real services (reusing any that already run), build, run the
# black-box tests in tests/, and stop exactly the services this run started.
source "$(dirname "$0")/lib.sh"
cd "$QP_ROOT"

need cargo "install Rust with rustup (https://rustup.rs)"

t0=$SECONDS
# clippy builds librdkafka from source, which needs system headers; on a new machine nothing
# else has installed them yet.
bash hack/env.sh build-deps >&2
log "lint: rustfmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
bash hack/lint-chart.sh
log "unit tests (no services)"
cargo test --workspace --exclude qp-tests
log "lint and unit tests passed in $((SECONDS - t0))s"

t1=$SECONDS
services_up

t2=$SECONDS
log "building binaries"
cargo build --workspace --bins
# The end-to-end tests run the project's image on the local node. It is built from the debug
# binaries just built (a release build would add minutes to every run); `make image` builds the
# release image users get.
t3=$SECONDS
archive="$(bash hack/image.sh --profile debug --no-build --print-archive)"
bash hack/env.sh load-image "$archive" >&2
log "e2e image built and imported in $((SECONDS - t3))s"
bash hack/env.sh status >&2 || true
export QP_ENV_FILE
# Integration tests start worker processes and share two cores; a bounded number of test threads
# keeps timing-sensitive assertions (latencies, reaction times) meaningful.
RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}" cargo test -p qp-tests --no-fail-fast
log "black-box tests passed in $((SECONDS - t2))s (services: $((t2 - t1))s)"
if [[ -f "$QP_RUN/e2e-times.txt" ]]; then
  log "end-to-end times on the node:"
  sed 's/^/    /' "$QP_RUN/e2e-times.txt" >&2
fi
