#!/bin/bash
# One GPU session's runs on nvidia-h200 (one H200), in stages that each fit one device call:
#   OUT=/tmp/out bash benchmarks/gpu_session.sh check|host|serve|kernels|final|sweep|sweep2|final2|verify|packed|ncu|split|split2|split_e2e|split_check|norm_e2e|norm_q8|pdl|pdl2|final3|q8|merge8|split_q8|e2e|packed_e2e|packed_q8|probe|rope|quant|quant2|quant70
# check: CUDA kernel tests, fp32 equivalence with transformers, bench_gpu (8B bf16 batch-1 + offline)
# host:  offline profile (GPU idle share), host ms per step on the GPU beside the baseline commit
# serve: a live server under `shardserve bench serve` (400 prompts, 1024 in / 128 out, rate inf)
# final: the int8 GEMV tests on CUDA, 8B Q4_K_M and Q8_0 batch-1 beside bf16, the Q4_K GEMV variants
# kernels: GGUF kernel tests on CUDA, the GGUF GEMV kernels beside bf16 (8B shapes), structured outputs (8B, 64 requests)
# offline: bench_gpu (8B bf16 batch-1 + offline) at its defaults (256 seqs, 8192 tokens per step) and at
#   vLLM's H200 offline defaults (1024 seqs, 16384 tokens per step)
# host16: host ms per step on the GPU and on the CPU (in process, TP=8) beside the baseline, the offline profile,
#   decode attention at the offline batch against the KV bytes it reads (a sweep of the kernel's tiling)
# sweep: the int8 GEMV's CUDA tests and every tiling of it on the 8B shapes (benchmarks/sweep_dp4a.py)
# sweep2: the same, both thread layouts at four tilings; final2: 8B Q4_K_M batch-1 decode beside bf16
# verify: what the fourth session could not time: the int8 GEMV tests, the Q6_K 4-block unit and Q8_0 in both
#   thread layouts, 8B Q4_K_M batch-1 beside bf16 with the tiling rule (no autotuning of the int8 GEMV)
# packed: the int8 GEMV on rows (and x) in the packed layouts (gguf_blocks.row_layout) beside file order, CUDA tests
# packed_e2e: 8B Q4_K_M batch-1 decode with rows in file order and packed, beside bf16 (one load each)
# ncu: Nsight Compute on the int8 GEMV kernels (stall reasons, occupancy), the tilings in both row layouts, 8B Q4_K_M
#   batch-1 decode in both row layouts beside bf16
# split: the int8 GEMV with blocks split across threads: its CUDA tests, its tilings on the 8B shapes
# split2: the same at the best tilings of split (the seventh session also timed the block loop unrolled
#   by 2, and software-pipelined, which was 5-20x slower: removed)
# split_e2e: the split kernels' CUDA tests, their rule's tiling on the 8B shapes, 8B Q4_K_M batch-1 decode beside bf16
# split_check: the split kernels' CUDA tests, the 8B Q4_K_M decode step per kernel
# norm_e2e: the RMSNorm with int8 output (a program per 512 elements) on CUDA, 8B Q4_K_M decode beside bf16, per kernel
# norm_q8: norm_e2e, then Q8_0's split kernel's CUDA tests and four of its tilings beside the thread-per-pair kernel
# pdl: the kernel tests under programmatic dependent launch, the 8B Q4_K_M step per kernel and with PDL on and
#   off, 8B Q4_K_M and Q8_0 batch-1 decode beside bf16
# pdl2: the 8B Q4_K_M and Q8_0 decode steps per kernel, and under four PDL settings
# final3: 8B Q4_K_M and Q8_0 batch-1 decode beside bf16, then 70B Q4_K_M on one H200
# q8: 8B Q8_0 batch-1 decode beside bf16
# merge8: the decode attention's merge writing o_proj's int8 input on CUDA, the 8B Q4_K_M step per kernel
# split_q8: the split kernels' CUDA tests (Q8_0's too), Q8_0's split kernel beside its thread-per-pair kernel
# e2e: the Q6_K int8 GEMV tests on CUDA, 8B Q4_K_M batch-1 decode with rows packed and in file order beside bf16
# packed_q8: 8B Q8_0 batch-1 decode, the 8B Q4_K_M decode step per kernel
# rope: RoPE and the KV store inside the split decode attention: CUDA tests, fp32 equivalence with transformers,
#   the 8B Q4_K_M step with RoPE inside and apart, 8B Q4_K_M and Q8_0 batch-1 decode beside bf16
# probe: the head's phases on the GPU, host ms per step beside the baseline, the 8B Q4_K_M decode step per kernel
# waves: the split int8 GEMVs compiled for fewer registers (more programs resident, fewer waves) beside the rule,
#   Q8_0's gate/up and LM head tilings (the served step under register caps, profile_decode --register-caps,
#   was timed at 5c36fc5 and the option removed: no gain)
# waves_short: the first run of waves
# q8rule: the split tiling rule's Q8_0 (64 threads a row on many-row weights) and Q4_K q/k (S = 4) picks: their
#   CUDA tests, 8B Q4_K_M and Q8_0 batch-1 decode beside bf16, the Q8_0 step by kernel, cells with
#   2-4 slices a thread (eE), Q6_K's and Q8_0's wider cells
# twoslices: Q4_K weights above 5120 rows at 4 x 8 with two rows' slices a thread: CUDA tests, 8B Q4_K_M
#   beside bf16 and by kernel, the 70B Q4_K shapes' cells, then the offline workload at 512 running requests
# rule70: the Q4_K rule's 70B picks (4 x 16, two rows' slices a thread) beside the 8B's and 70B's cells, cells
#   for the 4096-row Q4_K and the Q6_K weights, the offline workload at 256 and 512 running requests in one call
# offline512: the offline workload (bench_gpu) at 256 and at 512 running requests
# fp8sweep: the FP8 tests on CUDA, the FP8 GEMV's tilings at 1 row on the 8B shapes, 8B batch-1 decode in bf16,
#   FP8 at the rule's tiling and FP8 at each shape's swept best (bench_fp8.py fp8s), the 8B Q4_K 4 x 16 e2 cells
# fp8rule: the FP8 GEMV's CUDA tests, 8B FP8 beside bf16 with the fitted tiling rule (300 offline requests),
#   the offline workload at 256 and 512 running requests
# quant/quant2/quant70: GGUF and FP8 CUDA tests, 8B GGUF decode beside bf16, the embedded GGUF kept quantized,
#   FP8 weights and FP8 KV beside bf16, 70B Q4_K_M on one H200 (the embedded GGUF travels in two halves, .gguf/a|b)
# Wheels for what the device lacks lie in .whl/ (carried); the baseline commit's tree in .baseline/.
set -u
STAGE=${1:-check}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/fastapi ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
run() { echo "== $*"; "$@" 2>&1 | grep -v "Writing model shards" | tee -a "$OUT/$STAGE.log"; }
case "$STAGE" in
check)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  run timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_kernels.py tests/model_executor/test_sampler.py
  run timeout 120 python3 benchmarks/check_gpu_equivalence.py
  run timeout 330 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --json-out "$OUT/bench_gpu.json"
  ;;
host)
  run timeout 200 python3 benchmarks/bench_host_overhead.py --device cuda --layouts 1x1 --batches 1 256 --channel-tp \
      --baseline .baseline --steps 60 --json-out "$OUT/host_gpu.json"
  run timeout 380 python3 benchmarks/bench_host_overhead.py --device cpu --layouts 1x1 2x1 4x1 8x1 1x2 2x2 \
      --batches 1 256 --channel-tp 8 --baseline .baseline --steps 40 --warmup 5 --json-out "$OUT/host_cpu.json"
  ;;
offline)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  run timeout 280 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --json-out "$OUT/bench_gpu.json"
  run timeout 280 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --max-num-seqs 1024 \
      --max-num-batched-tokens 16384 --json-out "$OUT/bench_gpu_1024.json"
  ;;
host16)
  run timeout 150 python3 benchmarks/bench_host_overhead.py --device cuda --layouts 1x1 --batches 1 256 --channel-tp \
      --baseline .baseline --steps 60 --json-out "$OUT/host_gpu.json"
  run timeout 200 python3 benchmarks/bench_host_overhead.py --device cpu --layouts 1x1 8x1 --batches 1 256 \
      --channel-tp 8 --baseline .baseline --steps 40 --warmup 5 --json-out "$OUT/host_cpu.json"
  run timeout 120 python3 benchmarks/profile_decode.py --offline 120
  run timeout 200 python3 benchmarks/bench_attention.py --batch 256 --context 1152
  ;;
serve)
  DIR=$(python3 -c "import sys; sys.path.insert(0,'benchmarks'); from model_shapes import write_model_dir; print(write_model_dir('Llama-3.1-8B','/tmp/l8b'))")
  for TREE in this baseline; do
    SRC=$PWD; [ "$TREE" = baseline ] && SRC=$PWD/.baseline
    (cd "$SRC" && PYTHONPATH=/tmp/site:$SRC python3 -m shardserve serve "$DIR" --load-format dummy --max-model-len 4096 \
        --max-num-seqs 256 --max-num-batched-tokens 8192 --port 8017 > "$OUT/server_$TREE.log" 2>&1) &
    for _ in $(seq 180); do curl -sf localhost:8017/health > /dev/null && break; sleep 1; done
    echo "== bench serve against the $TREE tree"
    run timeout 200 python3 -m shardserve bench serve --base-url http://127.0.0.1:8017 --model "$DIR" \
        --request-rate inf --num-prompts 400 --random-input-len 1024 --random-output-len 128 --save-result \
        --result-dir "$OUT" --result-filename "serve_$TREE.json"
    pkill -f "shardserve serve" ; wait; sleep 2
  done
  ;;
quant)
  [ -f .gguf/a/part00 ] && cp .gguf/a/part00 /tmp/smollm2.part00
  run timeout 200 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py \
      tests/model_executor/test_gguf_layers.py tests/model_executor/test_fp8_kv_cache.py tests/model_executor/test_fp8.py
  run timeout 330 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M,Q8_0 \
      --json-out "$OUT/quant_8b.json"
  ;;
quant2)
  cat /tmp/smollm2.part00 .gguf/b/part01 > /tmp/smollm2.gguf
  run timeout 120 python3 -c "
from shardserve import LLM, SamplingParams
llm = LLM('/tmp/smollm2.gguf', dtype='bfloat16')
print('weights held on the GPU:', llm.engine.executor.runner.model.weight_bytes)
out = llm.chat([{'role': 'user', 'content': 'What is the capital of France?'}], SamplingParams(temperature=0, max_tokens=24))
print('embedded Q4_1 kept quantized, CUDA bf16:', repr(out[0].outputs[0].text))
"
  run timeout 420 python3 benchmarks/bench_fp8.py --parts hw,bf16,fp8,kv8 --num-requests 300 --json-out "$OUT/fp8.json"
  ;;
kernels)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  run timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "dp4a or paths_agree"
  run timeout 260 python3 benchmarks/bench_quant.py --skip-70b --parts hw,kernels --no-kernel-prefill \
      --kernel-paths dp4a --dp4a-rows 1,4 --json-out "$OUT/kernels.json"
  run timeout 170 python3 benchmarks/bench_structured_output.py --engine --model Llama-3.1-8B --requests 64
  ;;
final)
  run timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "dp4a_gemv and Q4_K"
  run timeout 420 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M,Q8_0 \
      --part-timeout 200 --json-out "$OUT/quant_8b.json"
  run timeout 100 python3 benchmarks/bench_quant.py --skip-70b --parts hw,kernels --no-kernel-prefill --kernel-types Q4_K \
      --kernel-paths dp4a --dp4a-rows 1 --json-out "$OUT/kernels_q4k.json"
  ;;
sweep)
  run timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "dp4a"
  run timeout 380 python3 benchmarks/sweep_dp4a.py
  ;;
sweep2)
  run timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "dp4a"
  run timeout 330 python3 benchmarks/sweep_dp4a.py --both-layouts --tilings 16x8x4,8x16x4,32x16x16,128x1x4 \
      --shapes qkv,o,gate_up,down,v,lm_head
  ;;
final2)
  run timeout 480 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M \
      --no-prefill-paths --part-timeout 330 --json-out "$OUT/quant_8b.json"
  ;;
verify)
  run timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "dp4a"
  run timeout 150 python3 benchmarks/sweep_dp4a.py --types Q6_K,Q8_0 --both-layouts --tilings 8x16x4,32x4x4,128x1x4
  run timeout 280 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M \
      --no-prefill-paths --part-timeout 240 --json-out "$OUT/quant_8b.json"
  ;;
packed)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  run timeout 300 python3 benchmarks/sweep_dp4a.py --tilings 8x16x4,16x8x4,32x4x4,128x1x4 --rows-layout both \
      --shapes qkv,o,gate_up,down,v,lm_head
  run timeout 220 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py \
      -k "packed or dp4a_gemv_both"
  ;;
ncu)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  run timeout 150 "$NCU" --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:"_q4_k_kernel|_q6_k_kernel" \
      python3 benchmarks/ncu_dp4a.py
  run timeout 130 python3 benchmarks/sweep_dp4a.py --types Q4_K,Q6_K --tilings 8x16x4,128x1x4 --rows-layout both \
      --shapes qkv,gate_up,down,v,lm_head
  run timeout 300 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file,packed --part-timeout 140 --json-out "$OUT/quant_8b.json"
  ;;
split)
  run timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split or dp4a_gemv_matches"
  run timeout 420 python3 benchmarks/sweep_dp4a.py --split 2,4,8 --split-tilings 1x4,2x4,4x4,8x4 --types Q4_K,Q6_K
  ;;
split2)
  run timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split"
  run timeout 470 python3 benchmarks/sweep_dp4a.py --split-cells 8x4x4,4x8x4,8x8x4,8x1x4,8x2x4,4x16x4,8x16x8 \
      --types Q4_K,Q6_K --shapes qkv,o,gate_up,down,lm_head
  ;;
split_e2e)
  run timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split or dp4a_gemv"
  run timeout 80 python3 benchmarks/sweep_dp4a.py --split-cells rule --types Q4_K,Q6_K
  run timeout 380 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 235 --json-out "$OUT/quant_8b.json"
  ;;
split_check)
  run timeout 260 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split or dp4a_gemv_matches"
  run timeout 240 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  ;;
norm_e2e)
  run timeout 60 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "rms_norm"
  run timeout 170 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 150 --json-out "$OUT/quant_8b.json"
  run timeout 80 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  ;;
norm_q8)
  run timeout 60 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "rms_norm or (split and Q8_0)"
  run timeout 170 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 150 --json-out "$OUT/quant_8b.json"
  run timeout 80 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  run timeout 170 python3 benchmarks/sweep_dp4a.py --split-cells 4x4x4,8x4x4,8x8x4,4x16x4 --types Q8_0
  ;;
pdl)
  run timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py tests/model_executor/test_kernels.py \
      -k "split or pdl or rms_norm or dp4a_gemv_matches or attention or rotary"
  run timeout 90 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  run timeout 330 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M,Q8_0 --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 140 --json-out "$OUT/quant_8b.json"
  ;;
pdl2)
  run timeout 150 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  run timeout 150 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q8_0 --reps 10
  ;;
final3)
  run timeout 165 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M,Q8_0 --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 120 --json-out "$OUT/quant_8b.json"
  df -h /tmp | tail -1
  run timeout 400 python3 benchmarks/bench_quant.py --models Llama-3.1-70B --parts hw,gguf --workdir /tmp/q70 \
      --no-prefill-paths --new-tokens 128 --part-timeout 370 --json-out "$OUT/quant_70b.json"
  ;;
q8)
  run timeout 200 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q8_0 --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 150 --json-out "$OUT/quant_8b_q8.json"
  ;;
merge8)
  run timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_kernels.py -k "int8_gemv_input or split_kv"
  run timeout 110 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  ;;
split_q8)
  run timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split"
  run timeout 300 python3 benchmarks/sweep_dp4a.py --split-cells 4x4x4,4x8x4,8x2x4,8x4x4,8x8x4,4x16x4 --types Q8_0
  ;;
e2e)
  run timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "dp4a_gemv and Q6_K"
  run timeout 500 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout packed,file --part-timeout 235 --json-out "$OUT/quant_8b.json"
  ;;
packed_e2e)
  run timeout 560 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M \
      --gguf-row-layout file,packed --no-prefill-paths --part-timeout 220 --json-out "$OUT/quant_8b_layouts.json"
  ;;
packed_q8)
  run timeout 300 python3 benchmarks/bench_quant.py --skip-70b --parts hw,gguf --recipes Q8_0 --no-prefill-paths \
      --part-timeout 260 --json-out "$OUT/quant_8b_q8.json"
  run timeout 250 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  ;;
probe)
  run timeout 120 python3 benchmarks/profile_host.py --device cuda --batches 1 256 --top 25
  run timeout 150 python3 benchmarks/bench_host_overhead.py --device cuda --layouts 1x1 --batches 1 256 \
      --baseline .baseline --steps 60 --json-out "$OUT/host_gpu.json"
  run timeout 280 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  ;;
rope)
  run timeout 150 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_kernels.py tests/model_executor/test_fp8_kv_cache.py \
      -k "(split or rotat or paged or padding or fp8) and not engine"
  run timeout 120 python3 benchmarks/check_gpu_equivalence.py
  run timeout 110 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  run timeout 300 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M,Q8_0 --no-prefill-paths \
      --new-tokens 128 --gguf-row-layout file --part-timeout 130 --json-out "$OUT/quant_8b.json"
  ;;
waves)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  run timeout 150 python3 benchmarks/sweep_dp4a.py --types Q4_K --shapes qk,o,gate_up,down \
      --split-cells 8x1x4,8x1x4r32,4x8x4,4x8x4r40,8x4x4r32,8x8x4r32,4x16x4r32,4x16x4r40
  run timeout 170 python3 benchmarks/sweep_dp4a.py --types Q8_0 --shapes qkv,o,gate_up,down,lm_head \
      --split-cells 8x2x4,8x1x4,4x2x4,4x4x4,2x4x4,4x16x4,8x4x4
  run timeout 60 python3 benchmarks/sweep_dp4a.py --types Q6_K --shapes down --split-cells 8x8x4,8x8x4r48,8x8x4r40,8x4x4
  ;;
waves_short)
  run timeout 150 python3 benchmarks/sweep_dp4a.py --types Q4_K --shapes o,gate_up,down \
      --split-cells 8x1x4,8x1x4r32,4x8x4,8x8x4r32,4x16x4r40
  ;;
q8rule)
  run timeout 90 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split and not engine"
  run timeout 300 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M,Q8_0 --no-prefill-paths \
      --new-tokens 128 --part-timeout 130 --json-out "$OUT/quant_8b.json"
  run timeout 120 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q8_0 --reps 10
  run timeout 100 python3 benchmarks/sweep_dp4a.py --types Q4_K --shapes qkv,o,gate_up,down \
      --split-cells 8x1x4,8x1x4e2,8x1x4e4,8x1x2e2,4x8x4e2,8x4x4e2,8x2x4e2
  run timeout 120 python3 benchmarks/sweep_dp4a.py --types Q6_K,Q8_0 --shapes v,down,lm_head,gate_up \
      --split-cells 8x8x4,8x16x4,4x16x4,4x8x4,8x4x4,4x4x4,8x2x4,2x16x4,8x8x4e2,4x16x4e2
  ;;
twoslices)
  run timeout 90 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_gguf_kernels.py -k "split and not engine"
  run timeout 200 python3 benchmarks/bench_quant.py --skip-70b --parts hw,bf16,gguf --recipes Q4_K_M --no-prefill-paths \
      --new-tokens 128 --part-timeout 130 --json-out "$OUT/quant_8b.json"
  run timeout 80 python3 benchmarks/profile_decode.py --model Llama-3.1-8B --gguf Q4_K_M --reps 10
  run timeout 80 python3 benchmarks/sweep_dp4a.py --types Q4_K --shapes qk,qkv_70b,o_70b,gate_up_70b,down_70b \
      --split-cells 4x8x4e2,8x2x4,8x4x4,8x1x4,4x16x4e2,4x4x4e2
  run timeout 60 python3 benchmarks/sweep_dp4a.py --types Q8_0,Q6_K --shapes gate_up,down --split-cells 4x16x4e2,8x8x4e2,4x16x4
  run timeout 130 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --max-num-seqs 512 \
      --json-out "$OUT/offline_512.json"
  ;;
rule70)
  run timeout 70 python3 benchmarks/sweep_dp4a.py --types Q4_K --shapes qkv,gate_up,qkv_70b,o_70b,gate_up_70b,down_70b \
      --split-cells 4x8x4e2,4x16x4e2
  run timeout 90 python3 benchmarks/sweep_dp4a.py --types Q4_K,Q6_K --shapes o,down,v,lm_head \
      --split-cells 4x8x4,2x16x4,4x4x4e2,2x8x4e2,4x8x2e2,8x4x4,8x2x4e2,4x4x4
  run timeout 130 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --json-out "$OUT/offline_256.json"
  run timeout 130 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --max-num-seqs 512 \
      --json-out "$OUT/offline_512.json"
  ;;
offline512)
  nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
  run timeout 130 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --json-out "$OUT/offline_256.json"
  run timeout 130 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --max-num-seqs 512 \
      --json-out "$OUT/offline_512.json"
  ;;
fp8sweep)
  run timeout 120 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_fp8.py
  run timeout 420 python3 benchmarks/bench_fp8.py --parts hw,kernels,bf16,fp8,fp8s --kernel-rows 1 --sweep \
      --num-requests 100 --json-out "$OUT/fp8_sweep.json"
  run timeout 60 python3 benchmarks/sweep_dp4a.py --types Q4_K --shapes qkv,gate_up --split-cells 4x8x4e2,4x16x4e2
  ;;
fp8rule)
  run timeout 60 python3 -m pytest -q -p no:cacheprovider tests/model_executor/test_fp8.py -k "gemv or per_token"
  run timeout 280 python3 benchmarks/bench_fp8.py --parts hw,bf16,fp8 --num-requests 300 --json-out "$OUT/fp8_rule.json"
  run timeout 115 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --json-out "$OUT/offline_256.json"
  run timeout 115 python3 benchmarks/bench_gpu.py --parts hw,shardserve --num-requests 1000 --max-num-seqs 512 \
      --json-out "$OUT/offline_512.json"
  ;;
quant70)
  df -h /tmp | tail -1; free -g | head -2
  run timeout 570 python3 benchmarks/bench_quant.py --models Llama-3.1-70B --parts hw,gguf --workdir /tmp/q70 \
      --no-prefill-paths --new-tokens 128 --part-timeout 480 --json-out "$OUT/quant_70b.json"
  ;;
esac
