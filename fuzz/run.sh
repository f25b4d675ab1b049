#!/usr/bin/env bash
# Runs every fuzz target (or those named) under libFuzzer for SECONDS each (default
# 60) and prints, per target, executions, coverage and whether it found anything.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Findings
# land in fuzz/artifacts/<target>/; add one to fuzz/corpus/<target>/ once fixed, and
# proxy/tests/fuzz_corpus.rs replays it in the ordinary suite from then on.
#
# -n runs the targets as last built, without building (cargo fuzz run rebuilds from
# the working tree before each target, so edits made during a long run would change,
# or break, the targets that follow).
#
# Usage: fuzz/run.sh [-t SECONDS] [-j JOBS] [-n] [target ...]
set -euo pipefail
SECONDS_EACH=60 JOBS=1 BUILD=1
while getopts "t:j:nh" opt; do
  case $opt in
    t) SECONDS_EACH=$OPTARG ;; j) JOBS=$OPTARG ;; n) BUILD=0 ;;
    *) sed -n '2,13p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
cd "$(dirname "$0")"
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(cargo +nightly fuzz list)
[ "$BUILD" = 0 ] || cargo +nightly fuzz build -O >&2
bin=target/x86_64-unknown-linux-gnu/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t" "work/$t"
  # A working copy of the corpus grows while fuzzing; the seeds in corpus/ stay small.
  log="work/$t.log"
  # -jobs > 1 sends libFuzzer's output to fuzz-N.log files; with one job it stays in $log.
  parallel=()
  [ "$JOBS" -gt 1 ] && parallel=(-jobs="$JOBS" -workers="$JOBS")
  if "$bin/$t" "work/$t" "corpus/$t" \
      -max_total_time="$SECONDS_EACH" "${parallel[@]}" \
      -artifact_prefix="artifacts/$t/" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
    result=clean
  else
    result="FOUND something (see fuzz/$log and fuzz/artifacts/$t/)"
    status=1
  fi
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
  [ -n "$done_line" ] || done_line=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  printf '%-10s %s: %s\n' "$t" "$result" "$done_line"
done
exit $status
