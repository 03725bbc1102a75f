#!/usr/bin/env bash
# The benchmarks that need a GPU or more cores than this project's 2-core machine, as one run on
# a lent machine (16 cores, one GPU, no network; see docs/benchmarks.md for what it gave):
#
#   agent overhead (the reference MLP, then every model family beside wandb and TensorBoard),
#   one sample against one read pass, and a stalled/absent collector on a CUDA model, then
#   `thermoscope loadgen` with each collector pinned to a core of its own: the 1,000 x 200 x 1 Hz
#   target, the peak on one core, the peak of 4 and 8 collectors sharded by job, and one job of
#   512 x 8 ranks flat and through node aggregators.
#
# Run from the repository root. Wheels in .whl/ (grpcio, protobuf, grpcio-health-checking for
# the machine's Python) are installed first when present; the package itself is put on the
# path without installing. Each benchmark's output goes to $OUT (or ./bench-out).
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
shim=$(mktemp -d)/thermoscope-path
mkdir -p "$shim/thermoscope"
for pair in agent:agent collector:collector cli:cli science:science wire:proto/wire v1:proto/thermoscope/v1; do
    ln -s "$PWD/${pair#*:}" "$shim/thermoscope/${pair%%:*}"  # the map of pyproject's package-dir
done
# the version the code reads (thermoscope.wire.contract.VERSION) is the installed metadata's:
# pyproject.toml's, here as an install would write it
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
mkdir -p "$shim/thermoscope-$version.dist-info"
printf 'Metadata-Version: 2.1\nName: thermoscope\nVersion: %s\n' "$version" >"$shim/thermoscope-$version.dist-info/METADATA"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
nproc | tee -a "$out/device.txt"

big=(--device cuda --width 4096 --depth 8 --batch 512 --steps 100 --rounds 3)
run() {  # name, command...
    local name=$1
    shift
    echo "== $name: $*"
    "$@" >"$out/$name.txt" 2>"$out/$name.err"
    echo "   exit $?"
    grep -E '^\|' "$out/$name.txt" | tail -6
}
run overhead_cuda python3 tests/bench/bench_overhead.py "${big[@]}"
# every family beside wandb and TensorBoard (arms whose package is missing are skipped, and
# the transformers workloads need transformers): one table per workload
run families_cuda python3 tests/bench/bench_families.py --device cuda --workload all
# one sample against one read pass on the GPU (issue 15 item 2: host time per sample, launches)
run sample_pass_cuda python3 tests/bench/bench_sample_pass.py --device cuda --steps 300
run blocked_cuda_every10 python3 tests/bench/bench_blocked.py "${big[@]}" --every 10
run blocked_cuda_every1 python3 tests/bench/bench_blocked.py "${big[@]}" --every 1
loadgen=(python3 -m thermoscope.cli loadgen --pin)
run load_target "${loadgen[@]}" --agents 1000 --layers 200 --rate 1 --duration 30 --warmup 10
run load_peak_1 "${loadgen[@]}" --agents 40 --layers 1000 --rate 0 --duration 20
run load_peak_4 "${loadgen[@]}" --agents 160 --layers 1000 --rate 0 --duration 20 --collectors 4
run load_peak_8 "${loadgen[@]}" --agents 320 --layers 1000 --rate 0 --duration 20 --collectors 8
# one job of 512 nodes x 8 ranks, flat against a merge per node (issue 15 item 5)
run nodes_512 "${loadgen[@]}" --nodes 512 --node-ranks 8 --layers 300 --rate 0.2 --duration 60 --warmup 15
