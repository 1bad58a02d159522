#!/bin/bash
# One lent-GPU call of the issue-18 measurements (run from the repo root; $OUT is the output dir):
#   bash benchmarks/issue18_device.sh profile   # fused-kernel check, per-kernel step breakdown, peer smoke
#   bash benchmarks/issue18_device.sh e2e       # full-depth e2e table of our engine (+ 8k-context KV rows)
#   bash benchmarks/issue18_device.sh peers     # full-depth peers (HF static cache, torchao int4) + our bf16
#   bash benchmarks/issue18_device.sh all       # the three in one call, each step cut to the time left
#   bash benchmarks/issue18_device.sh full      # the side-by-side table in one call: our four schemes
#        at full depth (built and compiled on the GPU; logits checked against the float model; b1
#        step profiled; 8k-context KV rows), then torchao int4 and HF bf16 on the same weights
#   bash benchmarks/issue18_device.sh prefill   # BENCHMARKS 13d: prefill 512/2048 and b32 decode at
#        full depth, four schemes, each prefill profiled, the engine's measured kernel choices
#        (~4 min: each quantized scheme's engine build times its linears' paths, Triton compiles
#        included), then the tiny-Llama GPU-vs-CPU-reference correctness rows
#   bash benchmarks/issue18_device.sh prefill-eager  # the prefill rows with eager prefill (A/B)
#   bash benchmarks/issue18_device.sh host    # decode sync vs overlapped, CUDA-graph prefill rows
#   TOK=DIR WHL=DIR bash benchmarks/issue18_device.sh final  # our four schemes at full depth (b1 / 8
#        / 32, prefill 512 / 2048 profiled, 8k-context KV rows, b1 step profile), then `engine start`
#        at 8 concurrent requests vs the direct engine (TOK: a tokenizer dir; WHL: the server wheels
#        when the image lacks fastapi / uvicorn), then the eager-prefill rows (A/B) in the time left (~9 min)
#   bash benchmarks/issue18_device.sh gemv    # the W4A16 decode GEMV: word-kernel selfcheck, memcheck
#        of the packed-fp16 GEMV, gemv4_sweep --h2 at M = 1, 8, 32 (< 5 min)
#   bash benchmarks/issue18_device.sh table     # first of two back-to-back calls (one warm machine, one
#        run): the word selfcheck (gemv4h rows cases; a failing rows case takes the rows variant out
#        of measured dispatch for this run, and says so), our five schemes at full depth (b1 / 8 /
#        32, prefill 512 / 2048, 8k-context KV rows, b1 step profile), HF bf16 generate at b1 (~10 min;
#        PEER_WHL: a folder of the peer wheels, torchao; default .whl)
#   TOK=DIR PEER_WHL=DIR SERVE_WHL=DIR bash benchmarks/issue18_device.sh peers-serve [LIMIT_S]  # second
#        call: torchao int4 + torch.compile(max-autotune) at b1 / b8, HF bf16 at b8 when time is
#        left, then `engine start` at 8 concurrent requests vs the direct engine (~10 min)
# torchao is not on the GPU image: its wheel travels in .whl/ (see the device README).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
if ls ${PEER_WHL:-.whl}/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site ${PEER_WHL:-.whl}/*.whl
  PEERS=/tmp/site
fi
case "$1" in
  profile)
    python3 -m sagequant.backends.cuda.fused_check 2>&1 | tee "$OUT/fused_check.txt"
    python3 benchmarks/engine_step_profile.py --layers 2 --schemes bf16 W4A16 W8A8-FP8 \
      --out "$OUT/profile_b1.json" 2>&1 | tee "$OUT/profile_b1.log"
    PYTHONPATH=$PYTHONPATH:$PEERS timeout 200 python3 benchmarks/peer_generate.py --layers 2 \
      --vocab 32000 --batches 1 --new-tokens 32 --out "$OUT/peers_smoke.json" 2>&1 | tail -8
    ;;
  e2e)
    python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 --schemes bf16 W4A16 W8A8-FP8 W8A16 \
      --batches 1 8 32 --prefill-len 512 2048 --prefill-reps 2 --new-tokens 64 --long-context 8192 \
      --long-schemes bf16 --budget-s 500 --skip-correctness --out "$OUT/e2e_full.json" 2>&1 | tail -40
    ;;
  peers)
    PYTHONPATH=$PYTHONPATH:$PEERS python3 benchmarks/peer_generate.py --layers 32 --vocab 128256 \
      --batches 1 8 --new-tokens 64 --out "$OUT/peers_full.json" 2>&1 | tail -20
    python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 --schemes bf16 W4A16 --batches 1 8 \
      --prefill-len 512 --prefill-reps 1 --new-tokens 48 --budget-s 200 --skip-correctness \
      --out "$OUT/e2e_same_machine.json" 2>&1 | tail -12
    ;;
  all)
    START=$(date +%s)
    left() { echo $(( ${1} - ($(date +%s) - START) )); }
    timeout 60 python3 -m sagequant.backends.cuda.fused_check 2>&1 | tee "$OUT/fused_check.txt" | tail -3
    timeout 100 python3 benchmarks/engine_step_profile.py --layers 2 --schemes bf16 W4A16 \
      --out "$OUT/profile_b1.json" > "$OUT/profile_b1.log" 2>&1; tail -8 "$OUT/profile_b1.log"
    timeout $(left 350) python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W8A8-FP8 W8A16 --batches 1 8 32 --prefill-len 512 2048 --prefill-reps 1 \
      --new-tokens 48 --long-context 8192 --long-schemes bf16 --budget-s $(left 320) \
      --skip-correctness --out "$OUT/e2e_full.json" > "$OUT/e2e_full.log" 2>&1
    tail -25 "$OUT/e2e_full.log"
    PYTHONPATH=$PYTHONPATH:$PEERS timeout $(left 515) python3 benchmarks/peer_generate.py --layers 32 \
      --vocab 128256 --batches 1 8 --new-tokens 48 --out "$OUT/peers_full.json" > "$OUT/peers_full.log" 2>&1
    tail -6 "$OUT/peers_full.log"
    ;;
  full)
    START=$(date +%s)
    left() { echo $(( ${1} - ($(date +%s) - START) )); }
    timeout $(left ${E2E_S:-300}) python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W8A8-FP8 W8A16 --batches 1 8 32 --prefill-len 512 2048 --prefill-reps 2 \
      --new-tokens 64 --long-context 8192 --long-schemes bf16 --profile-batches 1 --check-logits \
      --budget-s $(left $(( ${E2E_S:-300} - 20 ))) --skip-correctness --out "$OUT/e2e_full.json" > "$OUT/e2e_full.log" 2>&1
    grep -v "convert:" "$OUT/e2e_full.log" | tail -40
    for b in 1 8; do   # both peers at batch 1 first: each batch size compiles anew
      PYTHONPATH=$PYTHONPATH:$PEERS timeout $(left ${FULL_S:-520}) python3 benchmarks/peer_generate.py \
        --layers 32 --vocab 128256 --batches $b --new-tokens 64 --peers hf-bf16 torchao-int4 \
        --out "$OUT/peers_b$b.json" > "$OUT/peers_b$b.log" 2>&1
      tail -5 "$OUT/peers_b$b.log"
    done
    ;;
  prefill)
    timeout 280 python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W8A8-FP8 W8A16 --batches 32 --prefill-len 512 2048 --prefill-reps 2 \
      --new-tokens 32 --profile-prefill --budget-s 230 --correctness-s 40 \
      --out "$OUT/e2e_prefill.json" > "$OUT/e2e_prefill.log" 2>&1
    grep -v "convert:" "$OUT/e2e_prefill.log" | tail -60
    ;;
  prefill-eager)   # the prefill rows again with eager prefill, the default before CUDA-graph prefill (~3 min)
    timeout 240 python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W8A8-FP8 --batches --prefill-len 512 2048 --prefill-reps 3 \
      --eager-prefill --profile-prefill --budget-s 220 --skip-correctness \
      --out "$OUT/e2e_prefill_eager.json" > "$OUT/e2e_prefill_eager.log" 2>&1
    grep -v "convert:" "$OUT/e2e_prefill_eager.log" | tail -30
    ;;
  host)   # BENCHMARKS 13d/13e addenda: decode synchronous (--sync-decode) vs overlapped, bf16 and
          # W4A16 at b1 / b8, the second run also with CUDA-graph prefill (its capture seconds and
          # graph-pool growth per bucket in the JSON) and the prefill profile (~7 min)
    timeout 230 python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 --schemes bf16 W4A16 \
      --batches 1 8 --prefill-len 512 --prefill-reps 1 --new-tokens 64 --budget-s 210 \
      --skip-correctness --sync-decode --out "$OUT/e2e_sync_decode.json" > "$OUT/e2e_sync_decode.log" 2>&1
    grep -v "convert:" "$OUT/e2e_sync_decode.log" | tail -8
    timeout 300 python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 --schemes bf16 W4A16 \
      --batches 1 8 --prefill-len 512 2048 --prefill-reps 3 --new-tokens 64 --budget-s 280 \
      --profile-prefill --skip-correctness \
      --out "$OUT/e2e_overlap_prefill_graphs.json" > "$OUT/e2e_overlap_prefill_graphs.log" 2>&1
    grep -v "convert:" "$OUT/e2e_overlap_prefill_graphs.log" | tail -12
    ;;
  final)
    START=$(date +%s)
    left() { echo $(( ${1} - ($(date +%s) - START) )); }
    timeout ${E2E_S:-330} python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W8A8-FP8 W8A16 --batches 1 8 32 --prefill-len 512 2048 --prefill-reps 2 \
      --new-tokens 64 --long-context 8192 --long-schemes bf16 --profile-batches 1 --profile-prefill \
      --budget-s $(( ${E2E_S:-330} - 60 )) --correctness-s 35 --out "$OUT/e2e_final.json" > "$OUT/e2e_final.log" 2>&1
    grep -v "convert:" "$OUT/e2e_final.log" | tail -30
    python3 -c "import fastapi, uvicorn" 2>/dev/null || {
      python3 -m pip install -q --no-index --no-deps --target /tmp/serve-site "$WHL"/*.whl &&
      export PYTHONPATH=$PYTHONPATH:/tmp/serve-site; }
    timeout $(left ${SERVE_AT:-450}) python3 benchmarks/serving_gpu.py --tokenizer "$TOK" \
      --out "$OUT/serving_gpu.json" > "$OUT/serving_gpu.log" 2>&1
    grep -v "convert:" "$OUT/serving_gpu.log" | tail -3
    timeout $(left ${FINAL_S:-560}) python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W8A8-FP8 --batches --prefill-len 512 2048 --prefill-reps 3 --eager-prefill \
      --budget-s $(left $(( ${FINAL_S:-560} - 15 ))) --skip-correctness --out "$OUT/e2e_prefill_eager.json" \
      > "$OUT/e2e_prefill_eager.log" 2>&1
    grep -v "convert:" "$OUT/e2e_prefill_eager.log" | tail -12
    ;;
  gemv)   # the W4A16 decode GEMV (gemv4h, brief gemv): the word kernels' selfcheck; the packed-fp16
    # GEMV's cases under compute-sanitizer memcheck where the image has it (every tensor its own
    # allocation, padded: a read past a weight's end is reported); the sweep at M = 1, 8, 32, each
    # shape in its own process (< 5 min in all)
    timeout 110 python3 benchmarks/cuda_selfcheck.py --only words > "$OUT/selfcheck_words.txt" 2>&1
    echo "selfcheck rc=$?"; grep -c "^ok" "$OUT/selfcheck_words.txt"; grep -v "^ok" "$OUT/selfcheck_words.txt" | tail -8
    SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -n "$SAN" ]; then
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 40 "$SAN" --tool memcheck --padding 4096 --print-limit 10 \
        python3 benchmarks/cuda_selfcheck.py --only h2 > "$OUT/memcheck_h2.txt" 2>&1
      echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|selfcheck:" "$OUT/memcheck_h2.txt" | head -6
    else echo "memcheck: no compute-sanitizer on this image"; fi
    timeout 145 python3 benchmarks/gemv4_sweep.py --out "$OUT" --h2 --ms 1,8,32 --jobs 8 --isolate \
      --budget 125 > "$OUT/gemv4_sweep.log" 2>&1; echo "sweep rc=$?"
    grep -v "^{\"shape\"" "$OUT/gemv4_sweep.log" | tail -8
    grep "^{\"shape\"" "$OUT/gemv4_sweep.log" | cut -c1-400
    ;;
  table)
    START=$(date +%s)
    left() { echo $(( ${1} - ($(date +%s) - START) )); }
    timeout 100 python3 benchmarks/cuda_selfcheck.py --only words > "$OUT/selfcheck_words.txt" 2>&1; rc=$?
    echo "selfcheck rc=$rc ok=$(grep -c '^ok' "$OUT/selfcheck_words.txt")"; grep -v '^ok' "$OUT/selfcheck_words.txt" | tail -8 | cut -c1-300
    if [ $rc -ne 0 ] || grep -v '^ok' "$OUT/selfcheck_words.txt" | grep -q 'BM=[248],'; then
      echo "gemv4h rows variant taken out of measured dispatch for this run"
      sed -i 's/^        if m > 1:  # each weight tile/        if False:  # each weight tile/' \
        sagequant/backends/cuda/measured_dispatch.py
    fi
    timeout 335 python3 benchmarks/e2e_generation.py --layers 32 --vocab 128256 \
      --schemes bf16 W4A16 W4A16-LM8 W8A8-FP8 W8A16 --batches 1 8 32 --prefill-len 512 2048 \
      --prefill-reps 2 --new-tokens 64 --long-context 8192 --long-schemes bf16 --profile-batches 1 \
      --budget-s 315 --skip-correctness --out "$OUT/e2e.json" > "$OUT/e2e.log" 2>&1
    echo "e2e rc=$?"; grep -v convert: "$OUT/e2e.log" | tail -26 | cut -c1-300
    PYTHONPATH=$PYTHONPATH:$PEERS timeout $(left 585) python3 benchmarks/peer_generate.py --layers 32 \
      --vocab 128256 --batches 1 --new-tokens 64 --peers hf-bf16 --out "$OUT/peers_hf_b1.json" \
      > "$OUT/peers_hf_b1.log" 2>&1
    echo "hf b1 rc=$?"; grep '^{' "$OUT/peers_hf_b1.log" | tail -2 | cut -c1-300
    ;;
  peers-serve)
    START=$(date +%s); LIMIT=${2:-588}
    left() { echo $(( ${1} - ($(date +%s) - START) )); }
    PYTHONPATH=$PYTHONPATH:$PEERS timeout $(left 250) python3 benchmarks/peer_generate.py --layers 32 \
      --vocab 128256 --batches 1 8 --new-tokens 64 --peers torchao-int4-compiled \
      --out "$OUT/peers_torchao.json" > "$OUT/peers_torchao.log" 2>&1
    echo "torchao rc=$?"; grep '^{' "$OUT/peers_torchao.log" | tail -2 | cut -c1-300
    if [ $(left $LIMIT) -gt 330 ]; then
      PYTHONPATH=$PYTHONPATH:$PEERS timeout $(( $(left $LIMIT) - 240 )) python3 benchmarks/peer_generate.py \
        --layers 32 --vocab 128256 --batches 8 --new-tokens 64 --peers hf-bf16 \
        --out "$OUT/peers_hf_b8.json" > "$OUT/peers_hf_b8.log" 2>&1
      echo "hf b8 rc=$?"; grep '^{' "$OUT/peers_hf_b8.log" | tail -1 | cut -c1-300
    fi
    python3 -c "import fastapi, uvicorn" 2>/dev/null || {
      python3 -m pip install -q --no-index --no-deps --target /tmp/serve-site "$SERVE_WHL"/*none-any.whl \
        "$SERVE_WHL"/*cp312*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/serve-site; }
    timeout $(left $LIMIT) python3 benchmarks/serving_gpu.py --tokenizer "$TOK" \
      --out "$OUT/serving_gpu.json" > "$OUT/serving_gpu.log" 2>&1
    echo "serving rc=$?"; grep -v "convert:" "$OUT/serving_gpu.log" | tail -4 | cut -c1-400
    ;;
  *) echo "usage: $0 profile|e2e|peers|all|full|prefill|prefill-eager|final|gemv|table|peers-serve"; exit 2 ;;
esac
