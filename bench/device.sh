#!/usr/bin/env bash
# The device checks of issues 12 and 13 as one command for the lent GPU machine (one H200, 16
# cores, no network), inside 8 minutes: bench/gpu.py (bare model, served GPU lanes with a py-spy
# profile where py-spy travels, placement with 1 worker), placement again with 8 workers (8
# event loops: the CPU lanes, not one loop, are then what saturates first), then
# bench/ceiling.py with streams (1 and 8 workers, each also with --grpc-io event-engine) and
# bench/scaleout.py with and without --backlog 8 and with the client's throttle (1 and 8
# workers). JSON and the servers' logs go to $OUT, as at most 8 files.
#
# Here, once:  make family && ../shared/device/pack-wheels.sh .whl   (.whl is git-ignored)
# Then:        run(command="bash bench/device.sh", carry=[".whl", "families/mnist5k"],
#                  timeout_s=590)
# And back here: copy the JSON files into results/bench/ and run bench/report.py; the py-spy
# profiles in logs.tgz: bench/profile_summary.py logs/profile-cuda-b1.txt --through run_forever
# On a CPU, to check the script itself in ~3 minutes:  OUT=/tmp/out QUICK=1 bash bench/device.sh
set -uo pipefail
out=${OUT:?set OUT: where the figures go}
logs="$out/logs"
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # the packages the machine's image lacks (../shared/device/pack-wheels.sh)
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD" PATH="$site/bin:$PATH"  # py-spy's wheel holds a binary
fi
py=${PYTHON:-python3}
family=${FAMILY:-families/mnist5k}
if [ -n "${QUICK:-}" ]; then  # the same steps, seconds each, the GPU lanes' code on the CPU
    gpu=(--quick --accelerator cpu --profile)
    placement=(--quick --accelerator cpu --placement-workers 2)
    ceiling=(--workers-list 1,2 --clients 2 --seconds 1 --warmup 0.5 --repeats 1)
    scaleout=(--workers-list 1,2 --rates 100,200 --seconds 1 --clients 2)
else
    gpu=(--max-seconds 200 --profile --workers-list 1,8)
    placement=(--max-seconds 100 --placement-workers 8 --clients 8)
    ceiling=(--workers-list 1,8 --clients 8 --seconds 2 --warmup 1 --repeats 1)
    scaleout=(--workers-list 1,8 --rates 800,1600,3200,6400,12800 --seconds 3 --clients 8)
fi
failed=0
step() {  # a failed step is reported and the next one still runs
    local name=$1; shift
    local t=$SECONDS
    echo "== $name: $*"
    "$@" || { echo "== $name FAILED (exit $?)"; failed=1; }
    echo "== $name: $((SECONDS - t)) s"
}
step gpu "$py" bench/gpu.py --family "$family" --json "$out/gpu.json" --logs "$logs" "${gpu[@]}"
step placement-w8 "$py" bench/gpu.py --family "$family" --phases host,placement \
    --json "$out/gpu-placement-w8.json" --logs "$logs/w8" "${placement[@]}"
# --grpc-io event-engine beside the default in the same rounds: measured on 2 cores only so far.
step ceiling "$py" bench/ceiling.py --family "$family" --stream --json "$out/ceiling.json" \
    --compare "event-engine=--grpc-io event-engine" "${ceiling[@]}"
step scaleout "$py" bench/scaleout.py --family "$family" --flags "" --flags "--backlog 8" \
    --client-throttle --json "$out/scaleout.json" --logs "$logs" "${scaleout[@]}"
tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$logs"
echo "== all: ${SECONDS} s; files: $(ls "$out" | tr '\n' ' ')"
exit $failed
