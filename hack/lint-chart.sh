#!/usr/bin/env bash
# The chart's half of `make lint`: render it with its defaults and with every toggle on, and
# check both renders with kube-score, a third-party Kubernetes manifest linter (built once from
# the Go module proxy and cached by version). Zero findings is the bar. The exceptions are
# annotated in the chart (`kube-score/ignore` on the object, with the reason next to it), except
# two that are flags here:
#   --ignore-container-cpu-limit   no CPU limit by design (charts/.../values.yaml says why)
#   --ignore-test pod-networkpolicy  defaults only: NetworkPolicies are a toggle, off by default
#                                  (they need a CNI that enforces them); the render with every
#                                  toggle on is checked for them
source "$(dirname "$0")/lib.sh"
cd "$QP_ROOT"

bash hack/build-helm.sh >/dev/null
if [[ ! -x "$KUBE_SCORE_BIN/kube-score" ]]; then
  need go "install Go 1.25 or newer (https://go.dev/dl) or apt-get install golang"
  mkdir -p "$KUBE_SCORE_BIN" "$QP_CACHE/build"
  build() {
    CGO_ENABLED=0 GOBIN="$KUBE_SCORE_BIN" go install -trimpath \
      "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"
  }
  run_logged "building kube-score $KUBE_SCORE_VERSION (first time only, ~1-2 min)" \
    "$QP_CACHE/build/kube-score-$KUBE_SCORE_VERSION.log" build
fi

chart=charts/queue-processor
every_toggle=(--set networkPolicy.enabled=true --set serviceMonitor.enabled=true
  --set podMonitor.enabled=true --set prometheusRule.enabled=true
  --set grafanaDashboard.enabled=true)
# One line per check; findings are printed, passes and skips only counted.
score() {
  "$KUBE_SCORE_BIN/kube-score" score --ignore-container-cpu-limit \
    --enable-optional-test container-seccomp-profile --output-format ci "$@" - \
    | awk '/^\[OK\]/ {ok++; next} /^\[SKIPPED\]/ {skip++; next} {print; bad++}
           END {printf "    %d checks passed, %d skipped, %d findings\n", ok, skip, bad; exit bad > 0}'
}

rc=0
log "kube-score: the chart with its defaults"
"$HELM_BIN/helm" template qp "$chart" --namespace qp-system \
  | score --ignore-test pod-networkpolicy || rc=1
log "kube-score: the chart with every toggle on"
"$HELM_BIN/helm" template qp "$chart" --namespace qp-system "${every_toggle[@]}" \
  | score || rc=1
((rc == 0)) || die "kube-score found problems in the chart (above)"
log "kube-score: no findings"
