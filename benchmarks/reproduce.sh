#!/usr/bin/env bash
# Every number in BENCHMARKS.md, section by section, with the commands the sections show.
# Several hours on 2 cores; run on an otherwise idle machine (timings take the bench lock).
#   bash benchmarks/reproduce.sh            # everything
#   bash benchmarks/reproduce.sh onnx kv    # only the sections whose names are given
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
PY=.venv/bin/python
EDGETOK=.venv/bin/edgetok
LOCK="flock /tmp/edgetok-bench.lock"
want() { [ -z "$SECTIONS" ] || [[ " $SECTIONS " == *" $1 "* ]]; }
SECTIONS="$*"

if want bench; then  # `edgetok bench`: edgetok vs llama.cpp, onnxruntime-genai and transformers
  $LOCK $EDGETOK bench smollm2 --contexts 1024,4096,8192 --new-tokens 64 --kv-budget 100%,25% \
    --peers llamacpp,ortgenai,transformers --system 'edgetok KV 25% + int8 weights=--kv-budget 25% --weights int8' \
    --threads 1 --repeat 2 --out benchmarks/results/bench
fi
if want onnx; then  # ONNX export: size and parity; decode vs onnxruntime-genai
  $PY benchmarks/onnx_quality.py
  $LOCK $EDGETOK bench smollm2 --contexts 1024,8192 --new-tokens 64 --kv-budget 100%,25% --peers llamacpp,ortgenai \
    --system 'int8 KV 25%=--weights int8 --kv-budget 25%' --onnx int4 --onnx 'int4 --zero-points integer --head-bits 4' \
    --onnx 'int4 --attention standard' --threads 2 --repeat 2 --out benchmarks/results/bench-2t
fi
if want genai; then $PY benchmarks/genai_agreement.py; fi  # --genai folders in onnxruntime-genai: greedy agreement, parity
if want spec; then  # speculative decoding: edgetok (the default engine, torch) vs transformers' and llama.cpp's lookup decoding
  $LOCK $PY benchmarks/speculative_costs.py --out benchmarks/results/speculative_costs_session17.json
  $LOCK $PY benchmarks/speculative_costs.py --engine torch --out benchmarks/results/speculative_costs_torch_session17.json
  $LOCK $PY benchmarks/speculative.py --repeat 2 --threads 2 --only default,llama.cpp --sets input-grounded,open,verbatim \
    --out benchmarks/results/speculative_session17.json
  $LOCK $PY benchmarks/speculative.py --repeat 1 --threads 2 --only torch,transformers --sets input-grounded,open \
    --out benchmarks/results/speculative_torch_session17.json
fi
if want default; then  # the default engine's activations: agreement with fp32 on four kinds of text, 1K decode vs llama.cpp
  $LOCK $PY benchmarks/default_engine.py --out benchmarks/results/default_engine.json
fi
if want serve; then  # edgetok serve (ONNX int4, batched) vs llama-cpp-python's server at 1/2/4/8 clients
  $LOCK $PY benchmarks/serve.py --repeat 2 --threads 2 --out benchmarks/results/serve.json
fi
if want loops; then  # the kernels' inner loops alone, one thread: MatMulQ4's few rows, selection's bounds (session 9)
  g++ -O3 -std=c++17 -ffp-contract=fast -o /tmp/q4_loops benchmarks/q4_loops.cpp && $LOCK /tmp/q4_loops
  g++ -O3 -std=c++17 -fopenmp-simd -ffp-contract=fast -fno-math-errno -Wno-aggressive-loop-optimizations \
    -o /tmp/bounds_loops benchmarks/bounds_loops.cpp && $LOCK /tmp/bounds_loops
fi
if want decode; then $LOCK $PY benchmarks/decode_vs_transformers.py --context 1024 --new-tokens 64 --repeat 3; fi
if want gguf; then $PY benchmarks/gguf_quality.py --out bench-out/gguf; fi
if want gguf-types; then $LOCK $PY benchmarks/gguf_types.py --out bench-out/gguf-types; fi  # q4_k/q5_k/q6_k/iq4_nl vs llama.cpp's quantizer
if want allocator; then for stage in sensitivity llamacpp edgetok; do $LOCK $PY benchmarks/allocator.py --out bench-out/allocator --stage $stage --targets 4.6,5.0,5.35,6.15,6.55,8.5; done; fi  # size vs KL: the allocator vs llama.cpp's mixes
if want quant; then
  $PY benchmarks/quant_quality.py --out bench-out/quant --configs 32s,128a,32a --gguf
  $PY benchmarks/quant_quality.py --out bench-out/quant-ablation --configs 32s --methods rotate
fi
if want kv; then
  $PY benchmarks/kv_quality.py --contexts 4096,8000 --budgets 25% --new-tokens 128 --needle-depths 0.1,0.5,0.9 --tiers 16,64
  $EDGETOK export smollm2 --format onnx --weights int4 --no-verify --force -o bench-out/int4
  $EDGETOK export smollm2 --format onnx --weights int4 --attention standard --no-verify --force -o bench-out/int4-standard
  $LOCK $PY benchmarks/kv_speed.py --context 8000 --new-tokens 64 --repeat 2 --onnx bench-out/int4 --onnx bench-out/int4-standard \
    --out benchmarks/results/kv_speed.json
  $LOCK $PY benchmarks/kv_prefetch.py --context 8000 --new-tokens 64 --repeat 3 --threads 1
fi
if want prune; then
  $PY benchmarks/prune_prompt.py --contexts 8000 --keeps 0.5,0.3 --layers 2 --repeat 2 --threads 1 --parts speed
  $PY benchmarks/prune_prompt.py --contexts 8000,4096 --keeps 0.5,0.3 --layers 2,4,8 --repeat 1 --parts speed
  $PY benchmarks/prune_prompt.py --contexts 4096 --keeps 0.5,0.3 --layers 2,4,8 --parts agreement
  $PY benchmarks/prune_prompt.py --contexts 8000 --keeps 0.5,0.3 --layers 2 --parts agreement,needle
  $EDGETOK export smollm2 --format onnx --weights int4 --prune-after-layer 2 --no-verify --force -o bench-out/smollm2-int4
  $PY benchmarks/prune_prompt.py --model bench-out/smollm2-int4 --contexts 8000,4096 --keeps 0.5,0.3 --layers 2 \
    --repeat 2 --threads 2 --parts speed,agreement
fi
if want gemma; then  # Gemma 3 270M: bench at 1K–32K, export quality per format on four kinds of text, needles
  mkdir -p bench-out/gemma-kvdisk
  $LOCK $EDGETOK bench gemma3-270m --contexts 1024,8192,16384,32768 --new-tokens 64 --kv-budget 100%,25% \
    --peers llamacpp,transformers --system 'edgetok KV 25% over device/host/disk=--kv-budget 25% --kv-device-mb 8 --kv-host-mb 32 --kv-disk bench-out/gemma-kvdisk' \
    --threads 2 --repeat 1 --out benchmarks/results/gemma3-bench
  $LOCK $EDGETOK bench gemma3-270m --contexts 32768 --new-tokens 64 --kv-budget 100% --peers none \
    --system 'edgetok KV 25% over device/host/disk=--kv-budget 25% --kv-device-mb 8 --kv-host-mb 32 --kv-disk bench-out/gemma-kvdisk' \
    --threads 2 --repeat 1 --out benchmarks/results/gemma3-tiers-32k
  for only in published,gguf-q8_0 gguf-q4_0 onnx-fp16 onnx-int8 onnx-int4 onnx-int8-qdq onnx-int4-qdq default; do  # a lock hold each
    $LOCK $PY benchmarks/gemma_quality.py --out bench-out/gemma --only $only --json benchmarks/results/gemma3-quality.json
  done
  $LOCK $PY benchmarks/gemma_needle.py --contexts 16384 --depths 0.1,0.5,0.9 --budgets 25%,auto --json benchmarks/results/gemma3-needle.json
  for depth in 0.1 0.5 0.9; do
    $LOCK $PY benchmarks/gemma_needle.py --contexts 32768 --depths $depth --budgets 25%,auto --json benchmarks/results/gemma3-needle.json
  done
  $LOCK $PY benchmarks/gemma_needle.py --contexts 16384,32768 --depths 0.1,0.5,0.9 --budgets 25% --prune 0.5 --no-full --no-budgets \
    --json benchmarks/results/gemma3-needle.json
  # pruning inside the ONNX graph (the script takes the lock per prompt itself)
  $LOCK $EDGETOK export gemma3-270m --format onnx --weights int8 --no-verify --force -o bench-out/gemma3-int8
  $LOCK $EDGETOK export gemma3-270m --format onnx --weights int8 --prune-after-layer 2 --no-verify --force -o bench-out/gemma3-int8-prune
  $PY benchmarks/gemma_prune_onnx.py --plain bench-out/gemma3-int8 --pruning bench-out/gemma3-int8-prune --contexts 8192 \
    --depths 0.1,0.5,0.9 --keep 0.5 --json benchmarks/results/gemma3-prune-onnx.json
fi
if want fidelity; then  # seven kinds of text: budgets (25 %, auto) and pruning vs exact runs; pruning's 8K prefill
  $PY benchmarks/fidelity.py --kinds legal --contexts 8192 --parts speed --repeat 2 --out benchmarks/results/fidelity.json
  $PY benchmarks/fidelity.py --contexts 4096,8192 --budgets 25%,auto --needle-tokens 18 --out benchmarks/results/fidelity.json
  # per-head selection and chunk summaries (BENCHMARKS.md, issue 21's last section)
  K=legal,structured,dialogue,changelog,code,docs,essays
  $PY benchmarks/fidelity.py --kinds $K --contexts 4096 --budgets 25%/layer/off,25%/head/off,25%/head/on,auto/head/on \
    --parts agreement --keeps "" --out benchmarks/results/fidelity_perhead_4k.json
  $PY benchmarks/fidelity.py --kinds $K --contexts 4096 --budgets 25%,auto --parts agreement,needles --keeps "" \
    --out benchmarks/results/fidelity_final_4k.json
  $PY benchmarks/fidelity.py --kinds $K --contexts 8192 --budgets 25%/layer/off,25%,auto --parts agreement --keeps "" \
    --out benchmarks/results/fidelity_final_8k.json
fi
if want footprint; then  # the default engine's peak RSS at 1K and time to first token vs llama.cpp (--before DIR: older code)
  $LOCK $PY benchmarks/footprint.py --rounds 3 --out benchmarks/results/footprint.json
fi
