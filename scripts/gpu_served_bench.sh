#!/usr/bin/env bash
# Served benchmarks on an offline GPU machine, from the bundle scripts/gpu_carry.sh packs (carry .gpu-carry).
#   bash scripts/gpu_served_bench.sh STEP...     results go to $OUT (or build/gpu-results)
# steps: setup (unpack into /tmp/site) · kernels (bench/attention_bench.py: checks, then ours vs cuDNN/flash)
#        profile (Nsight Compute details of our Hopper kernel at 4,224 tokens, where ncu is installed, and its
#                 stall samples by code region: bench/ncu_regions.py)
#        quant (bench/rowwise_fp8_bench.py: fp8_linear's rowwise quantisation kernel, checks and speed)
#        step (bench/transformer_step_bench.py, one-GPU forward; STEP_MODELS, default "flux,wan480")
#        graphs (sp_bench, Flux 1024² with the whole forward as one CUDA graph, 1 GPU and all of them) · weights (random-weight FLUX.1-dev, bench/random_weights.py)
#        overhead-1 / overhead-2 (served vs in-process, FLUX.1-dev 1024², 28 steps, 1 and 2 GPUs)
#        overhead-1c / overhead-2c (the same with compile_transformer: true, compiled at load)
#        throughput-gpu (requests/s vs concurrency, FLUX.1-dev, 1 GPU) · throughput-cpu (tiny-flux, cpu-1thread)
#        bls-relay (one BLS hop per tensor: float32/bfloat16, host/GPU memory; bench/bls_relay.py)
#        stub-speed (Python and kernel launches inside the backend stub vs the interpreter; bench/stub_speed.py)
#        sp (bench/sp_bench.py on 1, 2 and 4 GPUs as the machine has: our Ulysses eager / compiled vs diffusers,
#            profiled with the host side; SP_MODEL="wan720 flux ..." (default wan720), SP_MODES (default as above;
#            add ring hybrid, and ours+graph ulysses+graph (+compile+graph) for whole-forward CUDA graphs),
#            SP_PROFILE="" to skip the profiled forward; writes sp-report.md)
# REPEATS (requests per phase), CYCLES (server phases between in-process ones), WARMUP_S (unmeasured heating)
# Each step is idempotent; /tmp/site and the weights survive between calls while the machine stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-results}
mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off (shared hosts)
weights=/tmp/flux1-dev-random
for step in "$@"; do
  echo "== $step $(date +%T)"
  smi=""
  case $step in overhead-*|throughput-gpu)  # clocks, power and temperature beside the timings
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,temperature.gpu,utilization.gpu --format=csv,noheader \
      -lms 2000 > "$out/gpu-clocks-$step.csv" & smi=$! ;;
  esac
  case $step in
    setup)
      if [ ! -d /tmp/site/pytriton ]; then
        mkdir -p /tmp/site
        for t in .gpu-carry/gpusite.tar.xz .gpu-carry/tritonserver-slim.tar.xz; do
          [ -f "$t" ] || { echo "skipping $t (not carried: steps without a server need only gpusite)"; continue; }
          python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$t" /tmp/site
        done
      fi
      # The backend stub's embedded interpreter ignores PYTHONPATH; a .pth in the system site puts /tmp/site first there too.
      echo 'import sys; sys.path.insert(0, "/tmp/site")' > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/00-gpu-carry.pth"
      # The image's scipy and peft are numpy-2 builds; beside the carried numpy 1.26 they fail to import, and
      # transformers/diffusers import them when present. Nothing here uses them: hide them on this throwaway machine.
      mkdir -p /tmp/hidden-packages
      for pkg in scipy peft; do
        dir=$(python3 -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.submodule_search_locations[0] if s else '')" $pkg 2>/dev/null || true)
        case $dir in ""|/tmp/site/*) ;; *) mv "$dir" /tmp/hidden-packages/ && echo "hid $dir" ;; esac
      done
      nvidia-smi -L; python3 -c "import torch, diffusers, transformers, tritonclient.grpc, tritonclient.http; import numpy; print('numpy', numpy.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
      python3 scripts/build_tiny_models.py tiny-flux ;;
    kernels)  # PRECISIONS: bf16,int8 by default (fp8 is known to miss its error bar; add it to re-measure)
      python3 -m bench.attention_bench --precisions ${PRECISIONS:-bf16,int8} --out "$out/attention-h100.md" ;;
    profile)  # Nsight Compute on our kernel at 4,224 tokens (whole waves, where it trails cuDNN most), if installed
      ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1 || true)
      if [ -z "$ncu" ]; then echo "no ncu on this machine: skipping the profile"; else
        "$ncu" --set full --import-source yes -k regex:_attn_fwd_hopper -c 1 -f -o "$out/attention-4224" \
          python3 -m bench.attention_bench --skip-check --precisions bf16 --sizes 4224 --out "$out/attention-4224.md"
        "$ncu" --import "$out/attention-4224.ncu-rep" --page details > "$out/attention-4224-ncu.txt"
        "$ncu" --import "$out/attention-4224.ncu-rep" --page source --csv --print-source sass > "$out/attention-4224-source.csv"
        python3 -m bench.ncu_regions "$out/attention-4224-source.csv" --out "$out/attention-4224-regions.md"
      fi ;;
    graphs)
      gpus=$(nvidia-smi -L | wc -l)
      python3 -m bench.sp_bench --model flux --gpus 1 "$gpus" --iters 5 --warmup 2 --modes ours ours+graph \
        ours+compile ours+compile+graph ulysses ulysses+graph ulysses+compile ulysses+compile+graph \
        --out "$out/sp_flux_graphs.jsonl"
      python3 -m bench.sp_report "$out"/sp_flux_graphs.jsonl --out "$out/sp-graphs-report.md" ;;
    quant)
      python3 -m bench.rowwise_fp8_bench --out "$out/rowwise-fp8-h100.md" ;;
    step)
      python3 -m bench.transformer_step_bench --models ${STEP_MODELS:-flux,wan480} --runs ${REPEATS:-3} --compile-baseline \
        --out "$out/transformer-step.md" ;;
    weights)
      [ -f $weights/model_index.json ] || python3 -m bench.random_weights --out $weights
      mkdir -p weights && ln -sfn $weights weights/FLUX.1-dev ;;
    overhead-1)
      python3 -m bench.serve_overhead --model flux1-dev --system gpu-1 --height 1024 --width 1024 --steps 28 \
        --repeats ${REPEATS:-3} --sequential --cycles ${CYCLES:-1} --warmup-s ${WARMUP_S:-0} --ready-timeout 900 \
        --out "$out/serve-overhead-gpu1.md"
      cp build/bench_server.log "$out/server-gpu1.log" ;;
    overhead-2)
      python3 -m bench.serve_overhead --model flux1-dev --system gpu-2 --height 1024 --width 1024 --steps 28 \
        --repeats ${REPEATS:-3} --sequential --cycles ${CYCLES:-1} --warmup-s ${WARMUP_S:-0} --ready-timeout 900 \
        --out "$out/serve-overhead-gpu2.md"
      cp build/bench_server.log "$out/server-gpu2.log" ;;
    overhead-1c|overhead-2c)
      n=${step#overhead-}; n=${n%c}
      sed 's/^compile_transformer:.*//' configs/system/gpu-$n.yaml > /tmp/gpu-$n-compiled.yaml
      echo "compile_transformer: true" >> /tmp/gpu-$n-compiled.yaml
      python3 -m bench.serve_overhead --model flux1-dev --system /tmp/gpu-$n-compiled.yaml --height 1024 --width 1024 \
        --steps 28 --repeats ${REPEATS:-3} --sequential --cycles ${CYCLES:-1} --warmup-s ${WARMUP_S:-0} --ready-timeout 900 \
        --out "$out/serve-overhead-gpu$n-compiled.md"
      cp build/bench_server.log "$out/server-gpu$n-compiled.log" ;;
    throughput-gpu)
      python3 -m bench.serve_throughput --model flux1-dev --systems gpu-1 --height 1024 --width 1024 --steps 8 \
        --requests 4 --concurrency 1,2 --no-perf-analyzer --out "$out/serve-throughput-gpu1.md" ;;
    bls-relay)
      python3 -m bench.bls_relay --repeats 20 --out "$out/bls-relay-gpu.md"
      cp build/bls_relay.log "$out/bls-relay-server.log" ;;
    sp)
      gpus=$(nvidia-smi -L | wc -l); counts=1; [ "$gpus" -ge 2 ] && counts="1 2"; [ "$gpus" -ge 4 ] && counts="1 2 4"
      for model in ${SP_MODEL:-wan720}; do
        python3 -m bench.sp_bench --model $model --gpus $counts --iters ${REPEATS:-2} --warmup 1 ${SP_PROFILE---profile host} \
          --modes ${SP_MODES:-ours ours+compile ulysses ulysses+compile ulysses+compile+overlap diffusers diffusers+compile} --out "$out/sp_$model.jsonl"
      done
      python3 -m bench.sp_report "$out"/sp_*.jsonl --out "$out/sp-report.md" ;;
    stub-speed)
      ldd "$(readlink -f "$(command -v python3)")" | grep -i libpython || echo "python3 links libpython statically"
      python3 -m bench.stub_speed --out "$out/stub-speed-gpu.md" ;;
    throughput-cpu)
      python3 -m bench.serve_throughput --systems cpu-1thread --no-perf-analyzer --out "$out/serve-throughput-cpu-host.md" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
  [ -z "$smi" ] || kill $smi
done
