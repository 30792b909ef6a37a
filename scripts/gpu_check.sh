#!/usr/bin/env bash
# CUDA checks for a machine with an NVIDIA GPU (CI has none; these tests skip there).
#
#   scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: runs/gpu
#
# 1. the CUDA exactness tests (a sharded layer on the GPU; a CPU rank and a GPU
#    rank in one job, gloo with host staging, kernel split and per-layer plan);
# 2. a CPU+GPU benchmark on the paper's CNN (kernels 500,1500, CIFAR-shaped
#    synthetic input, batch 64): the plan for cpu@0,cuda:0, then per-step time of
#    the GPU alone, the CPU core alone, and both with --shares auto;
# 3. a per-layer plan (--strategy layers) for ResNet-18 on cuda:0 beside cpu@0,
#    printed, trained, and timed against the GPU alone;
# 4. mixed precision: the fp16 (loss scaling) and CPU+GPU bf16 tests, then
#    ResNet-18 on the GPU in 32, bf16, fp16 (and fp16 channels_last), and a
#    bf16 per-layer plan with the CPU beside it;
# 5. where `nvidia-smi -L` lists two or more GPUs (else one line says it skipped):
#    kernel, per-layer and ddp plans across cuda:0,cuda:1 (NCCL), a kernel split
#    of cpu@0,cuda:0 (gloo), and auto resolved by two torchrun workers on the two
#    GPUs (profile and trials under NCCL), all with CONVSHARD_STRICT_DEVICES=1:
#    a collective's tensor off its rank's device fails the run;
# 6. on the same two GPUs, the overlapped schedule beside the plain one: the
#    kernel split of section 5 run again from its plan with every kernel-mode
#    group's gathers in 1 chunk (plain: each gather waited for at once) and in
#    4 chunks (each chunk's gather travels while the previous chunk's convs
#    run; docs/architecture.md, "Transfers beside compute"), and the kernel
#    split the planner sizes and chunks (--shares auto), in turn, two
#    rounds; per variant the median ms/step and the median
#    seconds per step rank 0 spent blocked in collectives.
# Needs a CUDA build of torch in .venv (or PYTHON=/path/to/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu}
mkdir -p "$OUT"

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY

echo "== CUDA exactness tests"
"$PYTHON" -m pytest -q -rs tests/test_sharded.py tests/test_layouts.py tests/test_batch.py -k cuda

echo "== CPU+GPU benchmark"
JOB=(--dataset synthetic --synthetic-shape 3,32,32 --kernels 500,1500 --batch-size 64)
export OMP_NUM_THREADS=1
"$PYTHON" -m convshard plan "${JOB[@]}" --devices cpu@0,cuda:0 --threads 1 --profile "$OUT/profile.json"
for run in "gpu:--strategy single --devices cuda:0" \
           "cpu:--strategy single --devices cpu@0 --threads 1" \
           "mixed:--devices cpu@0,cuda:0 --threads 1 --shares auto --profile $OUT/profile.json"; do
    name=${run%%:*}
    # shellcheck disable=SC2086
    "$PYTHON" -m convshard train "${JOB[@]}" ${run#*:} --max-steps 10 --quiet --metrics-out "$OUT/$name.json"
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for name in ("gpu", "cpu", "mixed"):
    m = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    print(f"{name:6s} {1000 * m['mean_step_seconds']:9.1f} ms/step  devices {m['devices']}  shares {m['shares']}")
PY

echo "== a per-layer plan with the GPU beside the CPU: ResNet-18 (CIFAR form), batch 64"
JOB=(--dataset synthetic --synthetic-shape 3,32,32 --model resnet18 --batch-size 64)
"$PYTHON" -m convshard plan "${JOB[@]}" --devices cuda:0,cpu@0 --threads 1 \
    --profile "$OUT/profile-resnet18.json"
"$PYTHON" -m convshard train "${JOB[@]}" --devices cuda:0,cpu@0 --threads 1 --strategy layers \
    --profile "$OUT/profile-resnet18.json" --max-steps 10 --quiet --metrics-out "$OUT/layers.json"
"$PYTHON" -m convshard train "${JOB[@]}" --strategy single --devices cuda:0 --max-steps 10 --quiet \
    --metrics-out "$OUT/layers-gpu.json"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for name in ("layers-gpu", "layers"):
    m = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    print(f"{name:10s} {1000 * m['mean_step_seconds']:9.1f} ms/step  devices {m['devices']}  plan {m['job_plan']}")
PY

echo "== mixed precision: bf16 and fp16 on the GPU alone, bf16 beside the CPU (ResNet-18, batch 64)"
"$PYTHON" -m pytest -q -rs tests/test_precision.py -k "cuda or fp16"
for run in "gpu-32:--strategy single --devices cuda:0 --precision 32" \
           "gpu-bf16:--strategy single --devices cuda:0 --precision bf16" \
           "gpu-fp16:--strategy single --devices cuda:0 --precision fp16" \
           "gpu-fp16-cl:--strategy single --devices cuda:0 --precision fp16 --memory-format channels_last" \
           "mixed-bf16:--strategy layers --devices cuda:0,cpu@0 --threads 1 --precision bf16"; do
    name=${run%%:*}
    # shellcheck disable=SC2086
    "$PYTHON" -m convshard train "${JOB[@]}" ${run#*:} --max-steps 10 --quiet --metrics-out "$OUT/$name.json"
done
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for name in ("gpu-32", "gpu-bf16", "gpu-fp16", "gpu-fp16-cl", "mixed-bf16"):
    m = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    print(f"{name:12s} {1000 * m['mean_step_seconds']:9.1f} ms/step  loss {m['train_loss']:.4f}  plan {m['job_plan']['precision']}")
PY

echo "== two GPUs: kernel, layers, ddp on cuda:0,cuda:1 (NCCL), and a CPU beside a GPU, every collective checked"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ "${GPUS:-0}" -lt 2 ]; then
    echo "skipped: nvidia-smi -L lists ${GPUS:-0} GPU(s); this section needs two"
else
    JOB=(--dataset synthetic --synthetic-shape 3,32,32 --model resnet18 --batch-size 64)
    export CONVSHARD_STRICT_DEVICES=1
    "$PYTHON" -m convshard plan "${JOB[@]}" --devices cuda:0,cuda:1 --profile "$OUT/profile-2gpu.json"
    for run in "2gpu-kernel:--strategy kernel --devices cuda:0,cuda:1" \
               "2gpu-layers:--strategy layers --devices cuda:0,cuda:1 --profile $OUT/profile-2gpu.json" \
               "2gpu-ddp:--strategy ddp --devices cuda:0,cuda:1" \
               "cpu-gpu-kernel:--strategy kernel --devices cpu@0,cuda:0 --threads 1"; do
        name=${run%%:*}
        # shellcheck disable=SC2086
        "$PYTHON" -m convshard train "${JOB[@]}" ${run#*:} --max-steps 10 --quiet --metrics-out "$OUT/$name.json"
    done
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m convshard train "${JOB[@]}" \
        --devices cuda:0,cuda:1 --strategy auto --max-steps 10 --quiet --metrics-out "$OUT/2gpu-torchrun-auto.json"
    unset CONVSHARD_STRICT_DEVICES
    "$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for name in ("2gpu-kernel", "2gpu-layers", "2gpu-ddp", "cpu-gpu-kernel", "2gpu-torchrun-auto"):
    m = json.loads((Path(sys.argv[1]) / f"{name}.json").read_text())
    print(f"{name:18s} {1000 * m['mean_step_seconds']:9.1f} ms/step  devices {m['devices']}  plan {m['strategy']}")
PY

    echo "== two GPUs: gathers into convs in 1 chunk (plain) and in 4 (overlapped), ResNet-18 kernel split, NCCL"
    "$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
plan = json.loads((out / "2gpu-kernel.json").read_text())["job_plan"]
for k in (1, 4):
    groups = [{**g, "chunks": k} if g["mode"] == "kernel" else g for g in plan["groups"]]
    (out / f"chunks-{k}.json").write_text(json.dumps({"job_plan": {**plan, "groups": groups}}))
PY
    for round in 1 2; do
        for k in 1 4 planned; do
            if [ "$k" = planned ]; then  # the kernel split the planner sizes and chunks from section 5's profile
                SPLIT=(--strategy kernel --shares auto --profile "$OUT/profile-2gpu.json")
            else
                SPLIT=(--plan "$OUT/chunks-$k.json")
            fi
            "$PYTHON" -m convshard train "${JOB[@]}" "${SPLIT[@]}" --devices cuda:0,cuda:1 --rebalance off \
                --max-steps 20 --quiet --metrics-out "$OUT/chunks-$k-$round.json"
        done
    done
    "$PYTHON" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
for k in ("1", "4", "planned"):
    runs = [json.loads((out / f"chunks-{k}-{r}.json").read_text()) for r in (1, 2)]
    step = statistics.median(1000 * m["mean_step_seconds"] for m in runs)
    blocked = statistics.median(s for m in runs for s in m["timeline"]["collective_seconds"][0])
    chunks = sorted({g.get("chunks", 1) for g in runs[0]["job_plan"]["groups"] if g["mode"] == "kernel"})
    print(f"chunks {k:8s} {step:9.1f} ms/step  rank 0 blocked in collectives {1000 * blocked:7.1f} ms/step  "
          f"kernel groups' chunks {chunks}")
PY
fi
