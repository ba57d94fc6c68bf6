#!/usr/bin/env bash
# Everything issue 6 measures, in one call on the GPU machine (the `device` tool), so that the
# fusion_train and HF-peer figures come from the same run. From the repository root, with the
# wheels of ../shared/bench/device_wheels.sh in .whl/ (carry it: `carry: [".whl"]`):
#   bash bench/gpu_suite.sh > $OUT/suite.jsonl
# PEER: the HF peer script (default shared/bench/peer_hf_chameleon.py); SKIP_PEER=1 leaves it out,
# with the GPU tests and bench/peers.py's comparisons.
# VARIANTS: the fusion_train runs, one per line (FlexAttention causal, then documents of about an
# image-text pair's length masked through flex and through SDPA's dense mask; the last, the long-
# context stage at 32K tokens per sequence, RoPE scaled: one GPU holds it with activation
# checkpointing, and sequence parallelism needs two or more, which the device machine lacks). A 1b variant takes about 3-4 min (10 optimizer steps of 2^20 tokens plus start-up and
# compilation) and one device call at most 10: split the list over calls, the peer in the first.
# The same loop runs the profile and the numerics check (later flags win over the common ones):
#   SKIP_PEER=1 VARIANTS="--zero 1 --compile --profile $OUT/profile" bash bench/gpu_suite.sh
#   SKIP_PEER=1 VARIANTS=$'--zero 1 --micro-steps 4 --steps 50 --log-every 1\n--zero 1 --compile --micro-steps 4 --steps 50 --log-every 1'
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >&2
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=8 WANDB_MODE=offline
PEER=${PEER:-shared/bench/peer_hf_chameleon.py}

if [ -z "${SKIP_PEER:-}" ]; then
  python3 -m pytest -q -m gpu tests/test_gpu.py >&2 || echo '{"gpu_tests": "failed"}'
  python3 "$PEER" --compile
  # bench/peers.py's comparisons that one GPU holds (the sharded one needs two; the loader's peer,
  # mosaicml-streaming, is not among the device wheels): the training step and the image tokenizer.
  python3 bench/peers.py train vq --rounds 3 || echo '{"peers": "failed"}'
  # Audio tokenization (needs soundfile and soxr among the wheels).
  python3 bench/audio_tokenizer.py --clips 64 --batch 32 || echo '{"audio_tokenizer": "failed"}'
fi

# 1b, seq 4096, micro-batch 8, 32 micro-steps (2^20 tokens per optimizer step), one switch at a time.
common="--preset 1b --seq-len 4096 --micro-batch 8 --micro-steps 32 --steps 5 --log-every 5"
VARIANTS=${VARIANTS:-"
--zero 1
--zero 1 --compile
--zero 1 --compile -- monitor.enabled=false
--zero 2 --compile
--zero 1 --compile --activation-checkpointing
--zero 1 --compile -- model.attention=flex
--zero 1 --compile --document-length 1100 -- data.document_mask=true model.attention=flex
--zero 1 --compile --document-length 1100 -- data.document_mask=true
--zero 3 --compile --activation-checkpointing --seq-len 32768 --micro-batch 1 --micro-steps 8 -- +stage=long_context model.max_seq_len=32768
"}
while IFS= read -r variant; do
  [ -z "$variant" ] && continue
  # shellcheck disable=SC2086
  python3 -m torch.distributed.run --standalone --nproc_per_node 1 bench/train_throughput.py $common $variant \
    2> >(tail -5 >&2) || echo "{\"variant\": \"$variant\", \"error\": \"exit $?\"}"
done <<< "$VARIANTS"
