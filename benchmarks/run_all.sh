#!/usr/bin/env bash
# Everything worth running on a GPU, in one command:
#
#     bash benchmarks/run_all.sh OUTDIR
#
#   1. the test suite on CUDA (pytest -q -x -m "not slow")        -> OUTDIR/tests.txt
#   2. the kernel sweep (python -m benchmarks.kernels)            -> OUTDIR/kernels.{json,csv,png}
#   3. the training benchmark (python -m benchmarks.train)        -> OUTDIR/train.{json,csv,png}
#   4. the generation benchmark (python -m benchmarks.generate)   -> OUTDIR/generate.{json,csv,png}
#   5. a training step's time by op (python -m benchmarks.profile) -> OUTDIR/profile.{json,csv,png}
#   6. a summary of which parts passed and what they measured     -> OUTDIR/summary.md, and on stdout
#
# Runs from the checkout (PYTHONPATH=., nothing installed), needs python3 with torch >= 2.11 and triton >= 3.6,
# and no network. The parts' time limits add up to 460 s, within 8 minutes. The benchmarks stop starting new rows
# before their limit and write what they measured even when stopped. A failing part is reported and the next one
# still runs; the script always exits 0 once the summary is written. Without a GPU it runs the --quick modes.
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash benchmarks/run_all.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=$(mktemp -d)  # the parts' full output; only the fourteen result files go to OUTDIR
START=$SECONDS

if [ "$($PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" = 1 ]; then
    MODE=gpu
    # Seconds per part (sum 460 s, under 8 minutes with the start-up), and each benchmark's own budget for
    # starting new rows, which leaves it time to finish the row in progress and write its files. Re-balanced when
    # the profile part came (was 150 + 150 + 110 + 50): kernels, train and generate gave 10, 15 and 15 s to it.
    TESTS_S=150; KERNELS_S=140; TRAIN_S=95; GENERATE_S=35; PROFILE_S=40
    KERNEL_ARGS=(--dropout 0.1 --warmup-ms 10 --rep-ms 40 --budget-s 100)
    # "blocks": each transformer block compiled (one graph reused by all layers): compiling the whole model
    # takes most of this part's budget per row; --compile model measures that too, given the time. Both losses
    # (plain, fused) run; the largest-batch search uses a 40 GiB budget (half an 80 GB card: comparable across
    # GPUs, and its steps at the largest batch stay short).
    TRAIN_ARGS=(--compile no blocks --memory-budget-gib 40 --budget-s 60)
    GENERATE_ARGS=(--repeats 2 --budget-s 25)
    # gpt2-124m, 16 x 1024 tokens, triton backend; the fused loss's profile is not started after 20 s
    PROFILE_ARGS=(--budget-s 20)
else
    MODE=cpu
    TESTS_S=900; KERNELS_S=180; TRAIN_S=180; GENERATE_S=180; PROFILE_S=180
    KERNEL_ARGS=(--quick --dropout 0.1)
    TRAIN_ARGS=(--quick)
    GENERATE_ARGS=(--quick)
    PROFILE_ARGS=(--quick)
fi

rm -f "$OUT"/{kernels,train,generate,profile}.{json,csv,png} "$OUT"/tests.txt "$OUT"/summary.md  # no stale results
PARTS=()
declare -A RESULT
# run_part NAME SECONDS LOG COMMAND...: run with a time limit, record passed / failed / timed out
run_part() {
    local name=$1 limit=$2 log=$3
    shift 3
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS rc result
    timeout -k 20 "$limit" "$@" >"$log" 2>&1
    rc=$?
    case $rc in
        0) result="passed" ;;
        124 | 137) result="timed out after ${limit} s" ;;
        *) result="failed (exit $rc)" ;;
    esac
    PARTS+=("| $name | $result | $((SECONDS - t0)) |")
    RESULT[$name]=$result
    echo "   $result in $((SECONDS - t0)) s"
    tail -n 3 "$log" | sed 's/^/   /'
}

run_part tests "$TESTS_S" "$OUT/tests.txt" $PY -m pytest -q -x -m "not slow" -p no:cacheprovider
run_part kernels "$KERNELS_S" "$LOGS/kernels.log" $PY -m benchmarks.kernels --out "$OUT" "${KERNEL_ARGS[@]}"
run_part train "$TRAIN_S" "$LOGS/train.log" $PY -m benchmarks.train --out "$OUT" "${TRAIN_ARGS[@]}"
run_part generate "$GENERATE_S" "$LOGS/generate.log" $PY -m benchmarks.generate --out "$OUT" "${GENERATE_ARGS[@]}"
run_part profile "$PROFILE_S" "$LOGS/profile.log" $PY -m benchmarks.profile --out "$OUT" "${PROFILE_ARGS[@]}"

# The summary: which parts passed, the tests' verdict, each benchmark's condensed table, the tail of failed logs.
{
    echo "# run_all summary ($MODE mode, $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS - START)) s)"
    echo
    $PY -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1 | tail -n 1
    $PY -c 'import triton; print("triton", triton.__version__)' 2>&1 | tail -n 1
    echo
    echo "| part | result | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${PARTS[@]}"
    echo
    echo "## tests"
    echo '```'
    tail -n 15 "$OUT/tests.txt"
    echo '```'
    for part in kernels train generate profile; do
        echo
        echo "## $part"
        echo '```'
        if [ -s "$OUT/$part.json" ]; then
            timeout 60 $PY -m benchmarks.$part --summarize "$OUT/$part.json" 2>&1
        else
            echo "no $part.json was written"
        fi
        if [ "${RESULT[$part]}" != passed ]; then
            echo "-- $part ${RESULT[$part]}; the last lines of its output:"
            tail -n 20 "$LOGS/$part.log"
        fi
        echo '```'
    done
} >"$OUT/summary.md" 2>&1

cat "$OUT/summary.md"
echo
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$LOGS"
exit 0
