#!/usr/bin/env bash
# make soak: does the suite hold on a busy machine and on any date?
#
#   tests/soak.sh load    the integration tests SOAK_RUNS times (default 10), with SOAK_HOGS
#                         CPU-bound processes beside them (default 2: `stress-ng --cpu`)
#   tests/soak.sh dates   the whole suite once at each of SOAK_DATES, the process clock of
#                         pytest and of everything it starts shifted there by `faketime`
#   tests/soak.sh         both
#
# Every run goes on to the end; the summary names each run's failures, and the exit status
# is 1 if any run failed. Logs: tests/artifacts/soak/. Needs stress-ng and faketime
# (Debian: apt-get install stress-ng faketime).
set -uo pipefail
cd "$(dirname "$0")/.."

BIN=.venv/bin
RUNS="${SOAK_RUNS:-10}"
HOGS="${SOAK_HOGS:-2}"
# The middle of a month, the first hours of one, a February (a leap day), a year's end (the
# run crosses midnight into the new year).
DEFAULT_DATES=("2027-03-15 12:00:00" "2027-04-01 00:20:00" "2028-02-29 12:00:00"
               "2026-12-31 23:45:00")
if [[ -n "${SOAK_DATES:-}" ]]; then
    IFS=',' read -r -a DATES <<< "$SOAK_DATES"
else
    DATES=("${DEFAULT_DATES[@]}")
fi
# What `make test` passes to pytest (parallel workers, a per-test timeout).
PYTEST_ARGS=(${SOAK_PYTEST_ARGS:--n 4 --timeout 600 -p no:cacheprovider -q})
OUT=tests/artifacts/soak
mkdir -p "$OUT"

need() {
    command -v "$1" >/dev/null || { echo "soak: $1 is missing (apt-get install $2)" >&2; exit 2; }
}

summary=()
failed=0

record() {  # record NAME LOG RC SECONDS
    local line
    line="$(grep -E '^(FAILED|ERROR) ' "$2" | sed 's/ - .*//' | sort -u | tr '\n' ' ')"
    if [[ "$3" == 0 ]]; then
        summary+=("$1: passed in $4 s ($(grep -Eo '[0-9]+ passed' "$2" | tail -1))")
    else
        failed=$((failed + 1))
        summary+=("$1: FAILED (exit $3) in $4 s: ${line:-see $2}")
    fi
}

load_runs() {
    need stress-ng stress-ng
    stress-ng --cpu "$HOGS" --cpu-method matrixprod --quiet &
    local hogs=$!
    trap 'kill $hogs 2>/dev/null' EXIT
    for ((n = 1; n <= RUNS; n++)); do
        local log="$OUT/load-$n.log" start=$SECONDS
        echo "soak: integration run $n/$RUNS with $HOGS CPU hogs ($log)"
        "$BIN/pytest" -m integration "${PYTEST_ARGS[@]}" -rfE >"$log" 2>&1
        record "load run $n/$RUNS" "$log" $? $((SECONDS - start))
    done
    kill "$hogs" 2>/dev/null
    wait "$hogs" 2>/dev/null
    trap - EXIT
}

# librdkafka (confluent-kafka's C client, in tests/integration/test_clients.py) runs its own
# threads on timed condition waits that libfaketime intercepts: under faketime one of its
# producers never delivered (seen once in four), a fault of the shifted clock, not of meter.
# Those tests run in every load run and in make test; the dated runs leave them out, and say so.
DATE_DESELECT=(--deselect tests/integration/test_clients.py)

date_runs() {
    need faketime faketime
    echo "soak: dated runs leave out ${DATE_DESELECT[*]#--deselect} (librdkafka under faketime)"
    for when in "${DATES[@]}"; do
        local log="$OUT/date-${when//[: ]/-}.log" start=$SECONDS
        echo "soak: the whole suite at $when UTC ($log)"
        TZ=UTC faketime "$when" "$BIN/pytest" "${PYTEST_ARGS[@]}" -rfE "${DATE_DESELECT[@]}" \
            >"$log" 2>&1
        record "at $when" "$log" $? $((SECONDS - start))
    done
}

case "${1:-all}" in
    load) load_runs ;;
    dates) date_runs ;;
    all) load_runs; date_runs ;;
    *) echo "usage: $0 [load|dates]" >&2; exit 2 ;;
esac

echo
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $((failed > 0))
