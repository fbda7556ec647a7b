#!/bin/bash
# Multi-GPU checks on one host with 2 GPUs (nvidia-h200-x2): TP/PP correctness, TP=2 decode speed,
# two launches as two "nodes" on disjoint GPUs, and the NCCL netbench table. Run from the repo root:
#   OUT=/tmp/out bash benchmarks/gpu_multi.sh [parallel|nodes|all]
set -u
STAGE=${1:-all}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$STAGE" != nodes ]; then
echo "== tiny Llama fp32 vs transformers: TP=2 (graphs, one-shot all-reduce), TP=2 eager, PP=2"
[ -n "${SKIP_EQUIV:-}" ] || timeout 150 python3 benchmarks/check_gpu_equivalence.py -tp 2 2>&1 | grep -v Writing
[ -n "${SKIP_EQUIV:-}" ] || timeout 120 python3 benchmarks/check_gpu_equivalence.py -pp 2 2>&1 | tail -1
echo "== Llama-3.1-8B bf16 batch-1 decode: TP=1, TP=2, TP=2 with NCCL only"
B="timeout 200 python3 benchmarks/bench_gpu.py --num-requests 0"
$B --parts hw,shardserve -tp 1 --json-out $OUT/tp1.json 2>&1 | tail -6
$B --parts hw,shardserve -tp 2 --json-out $OUT/tp2.json 2>&1 | tail -4
$B --parts shardserve -tp 2 --disable-custom-all-reduce --json-out $OUT/tp2_nccl.json 2>&1 | tail -2
python3 - "$OUT" <<'PY'
import json, sys
r = {k: json.load(open(f"{sys.argv[1]}/{k}.json"))["shardserve"] for k in ("tp1", "tp2")}
a, b = r["tp1"]["batch1_tokens"], r["tp2"]["batch1_tokens"]
n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
print(f"8B bf16 greedy: TP=2 agrees with TP=1 on the first {n} of {len(a)} tokens")
PY
cp $OUT/tp1.json /tmp/gpu_multi_tp1.json
fi
[ "$STAGE" = parallel ] && exit 0
echo "== two launches, --nnodes 2, PP=2, one GPU each"
DIR=$(python3 -c "import sys; sys.path.insert(0,'benchmarks'); from model_shapes import write_model_dir; print(write_model_dir('Llama-3.1-8B','/tmp/l8b'))")
S="python3 -m shardserve serve $DIR --load-format dummy -pp 2 --nnodes 2 --master-addr 127.0.0.1 --master-port 29511 --max-model-len 4096 --rendezvous-timeout 120"
CUDA_VISIBLE_DEVICES=0 $S --node-rank 0 --port 8011 > $OUT/node0.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 $S --node-rank 1 > $OUT/node1.log 2>&1 &
for i in $(seq 150); do curl -sf localhost:8011/health >/dev/null && break; sleep 2; done
python3 - "$OUT" <<'PY'
import json, sys, urllib.request, torch
prompt = torch.randint(3, 128256, (1, 128), generator=torch.Generator().manual_seed(3)).tolist()[0]
req = urllib.request.Request("http://127.0.0.1:8011/v1/completions", headers={"Content-Type": "application/json"},
    data=json.dumps({"prompt": prompt, "max_tokens": 32, "temperature": 0, "ignore_eos": True}).encode())
text = json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["text"]
ids = [int(w[1:]) for w in text.split()]
ref = json.load(open("/tmp/gpu_multi_tp1.json" if __import__("os").path.exists("/tmp/gpu_multi_tp1.json") else "tp1_h200.json"))["shardserve"]["batch1_tokens"]
n = next((i for i, (x, y) in enumerate(zip(ids, ref)) if x != y), len(ref))
print(f"two-node PP=2 server answered {len(ids)} tokens; agrees with TP=1 on the first {n} of {len(ref)}")
PY
grep -h -i -E "headless|joined|NCCL_SOCKET|interface" $OUT/node0.log $OUT/node1.log | head -5
kill %1 %2 2>/dev/null; sleep 3; kill -9 %1 %2 2>/dev/null
echo "== netbench NCCL, 2 GPUs"
timeout 150 python3 -m shardserve netbench --device cuda --max-bytes 1GiB --factor 8 --ops all_reduce,all_gather,reduce_scatter,sendrecv --json $OUT/netbench.json --plot $OUT/netbench.png 2>&1 | tail -45
