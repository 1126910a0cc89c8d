#!/usr/bin/env bash
# shared_vllm on the GPU machine, in few device calls (see ../shared/gpu/README.md for the kit):
#
#   bash benchmarks/gpu_session.sh tests   # pytest -m gpu: parity, visibility, zero copy, fence,
#                                          #   stock `vllm serve` + plugin
#   bash benchmarks/gpu_session.sh e2e     # arithmetic env -> API -> grpo.py shared_vllm, 25 steps
#   bash benchmarks/gpu_session.sh bench   # benchmarks/sync_latency.py: all three bridges
#   bash benchmarks/gpu_session.sh rest    # e2e, then bench
#   bash benchmarks/gpu_session.sh run CMD...  # any command, after the same set-up
#
# Needs the kit's parts in /root/kit and, in the call's carry, .whl/ (torch-optimi, torchao). Logs and JSON go to $OUT, which the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"

setup() {
  [ -d /root/kit/bundle ] || cat /root/kit/part* | tar xf - -C /root/kit || return 1
  source <(bash /root/kit/bundle/install_on_device.sh) || return 1
  if [ ! -f /root/site2/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site2 .whl/*.whl \
      && touch /root/site2/.installed || return 1
  fi
  # The vllm.general_plugins entry point needs the project's metadata on sys.path; the code
  # itself is imported from this checkout (first on PYTHONPATH).
  local info=/root/site2/grpo_single_copy-0.1.0.dist-info
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: grpo-single-copy\nVersion: 0.1.0\n' >"$info/METADATA"
  printf '[vllm.general_plugins]\ngrpo_bridge = vllm_patching.plugin:register\n' \
    >"$info/entry_points.txt"
  export PYTHONPATH=$PWD:/root/site2:$PYTHONPATH GRPO_MODELS_DIR=/root/models
  export PYTHONUNBUFFERED=1
  DEV=$(python3 -c "import torch; n = torch.cuda.get_device_name().lower(); \
print(next((k for k in ('h200', 'h100') if k in n), 'gpu'))")
  python3 - <<'PY' | tee -a "$OUT/env.txt"
import importlib.metadata as md, torch
eps = [e.value for e in md.entry_points(group="vllm.general_plugins")]
print("gpu", torch.cuda.get_device_name(), "torch", torch.__version__, "plugins", eps)
for d in ("vllm", "transformers", "peft", "torch-optimi", "pytest", "requests"):
    print(d, md.version(d))
PY
}

server_logs() {
  # The tails of every server/trainer log the run left behind, for a failed run's diagnosis.
  for f in $(find /tmp/pytest-of-root /tmp/e2e /tmp/sync -name '*.log' 2>/dev/null); do
    echo "=== $f"; tail -n 40 "$f"
  done >"$OUT/logs_$1.txt" 2>&1
}

setup || { echo "setup failed"; exit 1; }
case ${1:-tests} in
  tests)
    timeout 480 python3 -m pytest -m gpu -s -v -p no:cacheprovider tests/test_shared_vllm_gpu.py \
      2>&1 | tee "$OUT/pytest_gpu.log"
    rc=${PIPESTATUS[0]}; server_logs tests; exit "$rc" ;;
  e2e)
    timeout 560 python3 benchmarks/e2e_shared_vllm.py --steps 25 --run-dir /tmp/e2e \
      --out "$OUT/e2e_shared_vllm_$DEV.json" 2>&1 | tee "$OUT/e2e.log"
    rc=${PIPESTATUS[0]}; server_logs e2e; exit "$rc" ;;
  bench)
    timeout 560 python3 benchmarks/sync_latency.py --steps 20 --restarts 2 --run-dir /tmp/sync \
      --out "$OUT/sync_latency_$DEV.json" 2>&1 | tee "$OUT/bench.log"
    rc=${PIPESTATUS[0]}; server_logs bench; exit "$rc" ;;
  rest)  # e2e then bench in one call (the device budget favours few calls)
    timeout 260 python3 benchmarks/e2e_shared_vllm.py --steps 25 --eval 100 --run-dir /tmp/e2e \
      --vllm-args "--gpu-memory-utilization 0.3 --max-model-len 1024 --dtype bfloat16 --enforce-eager" \
      --out "$OUT/e2e_shared_vllm_$DEV.json" 2>&1 | tee "$OUT/e2e.log"
    rc1=${PIPESTATUS[0]}
    timeout 250 python3 benchmarks/sync_latency.py --steps 10 --restarts 1 --run-dir /tmp/sync \
      --out "$OUT/sync_latency_$DEV.json" 2>&1 | tee "$OUT/bench.log"
    rc2=${PIPESTATUS[0]}; server_logs rest; exit $((rc1 || rc2)) ;;
  run)
    shift; "$@" 2>&1 | tee -a "$OUT/run.log"
    rc=${PIPESTATUS[0]}; server_logs run; exit "$rc" ;;
  *) echo "usage: $0 tests|e2e|bench|rest|run CMD..."; exit 2 ;;
esac
