#!/usr/bin/env bash
# The GPU check, for a session that has a GPU machine (one run, about 5 minutes on an H100):
#   GPT-2 124M bf16 training tokens/s and MFU, eager and torch.compile'd; sampling tokens/s (cache, no cache,
#   transformers' generate()). Prints everything; the session quotes the figures in its notes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c "import torch, transformers, tiktoken, safetensors" 2>/dev/null || pip install -q -r requirements-test.txt
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== GPT-2 124M training, bf16, batch 16 x 1024 (eager, then compiled)"
python bench/train_throughput.py --model gpt2 --preset gpt2 --device cuda --dtype bfloat16 \
    --batch_size 16 --seq_len 1024 --steps 20 --warmup 5 --skip_minimal
python bench/train_throughput.py --model gpt2 --preset gpt2 --device cuda --dtype bfloat16 \
    --batch_size 16 --seq_len 1024 --steps 20 --warmup 10 --skip_minimal --compile
echo "== GPT-2 124M sampling, batch 1, greedy, 256 new tokens"
python bench/sample_throughput.py --preset gpt2 --device cuda --new_tokens 256 --repeats 3
echo "== FSDP on all visible GPUs, Llama 3.2 1B shape from scratch, bf16, batch 8 x 2048 per GPU:"
echo "   tokens/s, MFU and peak memory without and with activation checkpointing"
NGPU=$(nvidia-smi -L | wc -l)
python bench/train_memory.py --arch llama-1b --device cuda --dtype bfloat16 --nproc "$NGPU" \
    --batch_size $((8 * NGPU)) --seq_len 2048 --steps 12 --warmup 4 --only fsdp,fsdp+checkpoint
