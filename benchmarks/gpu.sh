#!/usr/bin/env bash
# One prepared run on a GPU machine (issue #9's GPU point), in about five minutes:
#
#     bash benchmarks/gpu.sh [OUT]        # OUT defaults to $OUT, else runs/gpu
#
# Nothing is installed: the GPU image has torch, transformers, peft and accelerate but no internet (and no
# `datasets`), so rlhfkit runs from src/. It writes to OUT:
#   versions.txt          GPU, driver, torch / transformers / peft / accelerate
#   quickstart_cuda.txt   the whole quickstart on the GPU (bf16 mixed precision: dtype auto)
#   quickstart_cpu.txt    the same on that machine's CPU, run at the same time (one thread)
#   compare.txt           the two side by side: gold reward, tokens/s, ms/step per stage; the ordering checked
#   tests.txt             the non-slow tests with the GPU visible (trainers default to device auto = cuda)
#   learn_memory.txt      only with MEMORY_SECONDS=N (about 150): PPO's learn pass on a 1024 x 12 tiny Llama, peak GPU
#                         memory with micro_batch_size and gradient checkpointing against neither (learn_memory.py)
set -uo pipefail
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu tries the script itself on a machine without a GPU
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c 'import torch, transformers, peft, accelerate as a; print("torch", torch.__version__, "cuda",
torch.version.cuda, "bf16", torch.cuda.is_bf16_supported(), "| transformers", transformers.__version__, "| peft",
peft.__version__, "| accelerate", a.__version__)'
} 2>&1 | tee "$out/versions.txt"

OMP_NUM_THREADS=1 "$py" -m rlhfkit.cli quickstart --device cpu --out "$out/qs_cpu" > "$out/quickstart_cpu.txt" 2>&1 &
cpu=$!
timeout 300 "$py" -m rlhfkit.cli quickstart --device "$device" --out "$out/qs_cuda" > "$out/quickstart_cuda.txt" 2>&1
echo "quickstart on $device: exit $?"; tail -n 14 "$out/quickstart_cuda.txt"
wait "$cpu"; echo "quickstart on cpu: exit $?"
"$py" benchmarks/compare_quickstarts.py "$out/qs_cpu/summary.json" "$out/qs_cuda/summary.json" 2>&1 | tee "$out/compare.txt"
rm -rf "$out"/qs_*/*/checkpoints "$out"/qs_*/{tiny,sft,rm,dpo,sft_chosen,ppo}/*.safetensors  # keep $OUT small

# one line per test (-v), so a run cut short by the timeout still says what passed and failed; in 8 workers
# where pytest-xdist is installed (it is in the GPU image). Not the 2-process tests: they compare gloo runs on the
# CPU to 1e-5 (CI runs them), and two processes on a one-GPU machine are refused (no GPU for local rank 1)
workers=$("$py" -c 'import xdist' 2>/dev/null && echo "-n 8")
OMP_NUM_THREADS=2 timeout "${TEST_SECONDS:-200}" "$py" -m pytest -v --tb=short -m "not slow" -p no:cacheprovider \
    --maxfail 20 $workers --ignore tests/models/test_distributed.py --ignore tests/models/test_fsdp.py \
    --ignore tests/models/test_zero.py tests > "$out/tests.txt" 2>&1
echo "tests: exit $?"; grep -E "FAILED|ERROR" "$out/tests.txt" | head -n 30; tail -n 3 "$out/tests.txt"

if [ "${MEMORY_SECONDS:-0}" -gt 0 ]; then
    timeout "$MEMORY_SECONDS" "$py" benchmarks/learn_memory.py --hidden 1024 --layers 12 --mini 64 --new_tokens 256 \
        --micro 16,4 > "$out/learn_memory.txt" 2>&1
    echo "learn memory: exit $?"; tail -n 9 "$out/learn_memory.txt"
fi
