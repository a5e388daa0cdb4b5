#!/usr/bin/env bash
# A small client of the qp-worker gateway: submits N JSON requests, then long-polls each one
# until it has a result, and prints a summary. Needs only bash and curl.
#
#   examples/client.sh [-n COUNT] [-u GATEWAY_URL] [-t TIMEOUT_SECONDS] [-k KEY_PREFIX]
#
#   -n  how many requests to submit (default 10)
#   -u  gateway base URL (default $QP_GATEWAY_URL or http://127.0.0.1:9090)
#   -t  give up on results after this many seconds (default 60)
#   -k  send Idempotency-Key: <prefix>-<i>; running the script twice with the same prefix
#       queues nothing new and reports the same results
#
# Exit status: 0 when every request finished as done, 1 otherwise.
set -euo pipefail

count=10
url="${QP_GATEWAY_URL:-http://127.0.0.1:9090}"
timeout=60
key_prefix=""
while getopts "n:u:t:k:h" opt; do
  case "$opt" in
    n) count="$OPTARG" ;;
    u) url="${OPTARG%/}" ;;
    t) timeout="$OPTARG" ;;
    k) key_prefix="$OPTARG" ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done

now_ms() { date +%s%3N; }
# json_field <name> <json>: the string value of a top-level field (enough for our answers).
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" <<<"$2"; }

started=$(now_ms)
ids=()
rejected=0
for ((i = 0; i < count; i++)); do
  headers=(-H 'Content-Type: application/json')
  [[ -n "$key_prefix" ]] && headers+=(-H "Idempotency-Key: $key_prefix-$i")
  # -w appends the HTTP status on its own line after the body.
  answer=$(curl -sS -X POST "${headers[@]}" -d "{\"n\": $i, \"sent_ms\": $(now_ms)}" \
    -w '\n%{http_code}' "$url/v1/requests") || { rejected=$((rejected + 1)); continue; }
  code=${answer##*$'\n'}
  body=${answer%$'\n'*}
  if [[ "$code" == 202 ]]; then
    ids+=("$(json_field id "$body")")
  else
    rejected=$((rejected + 1))
    echo "request $i: HTTP $code $body" >&2
  fi
done
echo "submitted ${#ids[@]} of $count requests in $(($(now_ms) - started)) ms"

done_count=0
failed=0
unfinished=0
deadline=$((SECONDS + timeout))
for id in "${ids[@]}"; do
  while :; do
    left=$((deadline - SECONDS))
    if ((left <= 0)); then
      unfinished=$((unfinished + 1))
      echo "$id: no result after ${timeout}s" >&2
      break
    fi
    # Long poll: the gateway answers as soon as the result is written (or after the wait).
    wait=$((left < 10 ? left : 10))
    answer=$(curl -sS --max-time $((wait + 5)) -w '\n%{http_code}' \
      "$url/v1/requests/$id?wait=$wait") || { sleep 1; continue; }
    code=${answer##*$'\n'}
    body=${answer%$'\n'*}
    case "$code" in
      200)
        if [[ "$(json_field status "$body")" == done ]]; then
          done_count=$((done_count + 1))
        else
          failed=$((failed + 1))
          echo "$id failed: $(json_field error "$body")" >&2
        fi
        break
        ;;
      202) ;;         # still pending or processing: poll again
      429 | 503) sleep 1 ;; # busy or a dependency is down: try again shortly
      *)
        failed=$((failed + 1))
        echo "$id: HTTP $code $body" >&2
        break
        ;;
    esac
  done
done

elapsed=$(($(now_ms) - started))
echo "submitted=${#ids[@]} rejected=$rejected done=$done_count failed=$failed" \
  "unfinished=$unfinished elapsed_ms=$elapsed"
[[ $done_count -eq $count ]]
