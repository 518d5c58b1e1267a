#!/usr/bin/env bash
# The GPU machine's steps, for the device tool: `bash benchmarks/gpu_run.sh STEP...`, run from the
# repository root with .whl (setuptools, wheel, pytest, hypothesis, fla-core, einops),
# .hf_wheels (transformers 5.24) and benchmarks/peers/_ext (benchmarks/peers/fetch.py) carried.
# Installs into target folders and runs `python3 -P`: the repository root would shadow the
# installed package (layoutpass.kernels lives in kernels/ here). Results go under $OUT.
#   tests      the GPU tests of the pass, and the CPU tests of lowering and Dynamo's stride guard
#   gputests   every GPU-marked test (kernels, models, the pass, transformers 5.24 lowered on CUDA)
#   hf         benchmarks/hf_zoo.py --gpu (transformers' own bf16 check, decode time beside it)
#   host       hf_zoo.py --gpu --host-profile for HOST_CLASSES (default Mamba2 Qwen3Next): host time per step
#   recurrent  benchmarks/recurrent.py with vLLM's and FLA's kernels (the kernel table; after sweep, its blocks)
#   sweep      the bf16 block sweep of SWEEP_OPS (default gdn,kda; benchmarks/recurrent.py --sweep-only)
#   ncu        Nsight Compute on one launch per recurrent case at B=256, peers included
#   conv       benchmarks/kernels.py with the conv peers
#   e2e        benchmarks/e2e.py (both models, eager and compiled rows)
#   profile    benchmarks/e2e.py --profile (kernel groups of eager and compiled decode steps)
set -u
OUT=${OUT:-/tmp/out}
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/lp . >/dev/null 2>&1 ||
  { echo "installing layoutpass failed"; exit 1; }
export PYTHONPATH=/tmp/lp:/tmp/site
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
python3 -P -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
EXT=benchmarks/peers/_ext
PEERS="--peer-ssm vllm_ssm:selective_state_update --peer-gdn vllm_gdn:fused_recurrent_gated_delta_rule --peer-kda vllm_gdn:fused_recurrent_kda"
NCU_METRICS=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,\
dram__bytes_write.sum,sm__warps_active.avg.pct_of_peak_sustained_active,sm__maximum_warps_per_active_cycle_pct,\
launch__registers_per_thread,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,\
l1tex__t_requests_pipe_lsu_mem_global_op_st.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum,l1tex__t_sector_hit_rate.pct,\
lts__t_sector_hit_rate.pct,smsp__issue_active.avg.pct_of_peak_sustained_active
for step in "$@"; do
  start=$(date +%s); echo "=== $step"
  case $step in
    tests) timeout 300 python3 -P -m pytest -q -p no:cacheprovider -n 4 tests/test_pass_gpu.py \
             tests/test_pass.py -k "gpu or cuda or lowered_to_the_kernel or own_memory" 2>&1 | tail -30 ;;
    gputests) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hf .hf_wheels/*.whl >/dev/null 2>&1
              PYTHONPATH=/tmp/hf:$PYTHONPATH timeout 330 python3 -P -m pytest -q -p no:cacheprovider -m gpu -n 8 \
                tests/test_pass_gpu.py tests/test_models.py tests/test_triton_kernels.py tests/test_recurrent_kernels.py \
                tests/test_hf.py tests/test_recurrent_lowering.py 2>&1 | tail -30 ;;
    hf) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hf .hf_wheels/*.whl >/dev/null 2>&1
        PYTHONPATH=/tmp/hf:$PYTHONPATH timeout 360 python3 -P benchmarks/hf_zoo.py --gpu --out "$OUT/hf" 2>&1 | tail -12 ;;
    host) python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/hf .hf_wheels/*.whl >/dev/null 2>&1
          for name in ${HOST_CLASSES:-Mamba2 Qwen3Next}; do
            PYTHONPATH=/tmp/hf:$PYTHONPATH timeout 200 python3 -P benchmarks/hf_zoo.py --gpu --host-profile "$name" 2>&1 |
              grep -v "^\[transformers\]\|^ *$\|Warning\|warn(" | cut -c1-200 | tee "$OUT/host_$name.txt" | tail -45
          done ;;
    recurrent) SWEPT=$OUT/sweep/recurrent_blocks.json  # a sweep's winners in the same call, if it ran first
               PYTHONPATH=$PYTHONPATH:$EXT timeout 420 python3 -P benchmarks/recurrent.py --fla $PEERS \
                 $( [ -f "$SWEPT" ] && echo --blocks "$SWEPT" ) --out "$OUT/recurrent" 2>&1 | grep -v "^checked" | tail -45 ;;
    sweep) PYTHONPATH=$PYTHONPATH:$EXT timeout 240 python3 -P benchmarks/recurrent.py --sweep-only --ops "${SWEEP_OPS:-gdn,kda}" \
             --dtypes bf16 --batches 64,256,1024 --out "$OUT/sweep" 2>&1 | tail -25 ;;
    ncu) mkdir -p "$OUT/ncu"
         PYTHONPATH=$PYTHONPATH:$EXT timeout 400 ncu --clock-control none --metrics "$NCU_METRICS" --section WarpStateStats \
           --csv --page raw python3 -P benchmarks/recurrent.py --profile --fla $PEERS --batches 256 --ops gdn,kda,ssm \
           --dtypes bf16 > "$OUT/ncu/raw.csv" 2> "$OUT/ncu/stderr.txt"; echo "ncu exit $?"
         grep '^profiled' "$OUT/ncu/raw.csv" | head -40
         python3 benchmarks/ncu_summary.py "$OUT/ncu/raw.csv" > "$OUT/ncu/summary.md"
         grep -v "| void at::" "$OUT/ncu/summary.md" | cut -c1-220 | head -60 ;;
    conv) PYTHONPATH=$PYTHONPATH:$EXT timeout 420 python3 -P benchmarks/kernels.py --peer-update vllm_conv:causal_conv1d_update \
            --peer-prefill vllm_conv:causal_conv1d_fn --fla --out "$OUT/conv" 2>&1 | tail -40 ;;
    e2e) timeout 560 python3 -P benchmarks/e2e.py --out "$OUT/e2e" 2>&1 | tail -40 ;;
    profile) mkdir -p "$OUT" && timeout 480 python3 -P benchmarks/e2e.py --profile 2>&1 | grep -v -i warn |
               tee "$OUT/e2e_profile.txt" | tail -120 ;;
    *) echo "unknown step: $step" ;;
  esac
  echo "--- $step: $(( $(date +%s) - start )) s"
done
