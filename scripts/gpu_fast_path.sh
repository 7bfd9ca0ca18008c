#!/usr/bin/env bash
# The fast-path measurements on an offline GPU machine (issue: fast path by default, serving within 1 % of
# diffusers), from the bundle scripts/gpu_carry.sh packs. Results go to $OUT (or build/gpu-results).
#   bash scripts/gpu_fast_path.sh STEP...
# steps: unpack        unpack whichever of .gpu-carry/*.tar.xz were carried into /tmp/site (once per machine)
#        weights       a random-weight FLUX.1-dev directory at /tmp/flux1-dev-random (bench/random_weights.py)
#        bench-a       diffusers before, the exact path, the fast path without fp8  (bench/fast_path_bench.py)
#        bench-b       the fast path as shipped, diffusers after, then the table of all five rows
#        check         scripts/check_fast_path.py on two prompts (on random weights: a run of the tool)
#        splitcheck    the kernel split's bit-identity check, when build/splitcheck was carried
# /tmp keeps the site, the weights and the rows between calls while the machine stays warm.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-results}
mkdir -p "$out" /tmp/fast-path
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bench="python3 -m bench.fast_path_bench --model flux1-dev --system gpu-1 --repeats ${REPEATS:-2} --rows /tmp/fast-path/rows.json --work-dir /tmp/fast-path"
for step in "$@"; do
  echo "== $step $(date +%T)"
  case $step in
    unpack)
      mkdir -p /tmp/site
      for t in .gpu-carry/*.tar.xz; do
        [ -f "$t" ] && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$t" /tmp/site && echo "unpacked $t"
      done
      # The backend stub's embedded interpreter ignores PYTHONPATH; a .pth in the system site puts /tmp/site first.
      echo 'import sys; sys.path.insert(0, "/tmp/site")' > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/00-gpu-carry.pth"
      mkdir -p /tmp/hidden-packages  # numpy-2 builds that fail beside the carried numpy 1.26
      for pkg in scipy peft; do
        dir=$(python3 -c "import importlib.util as u, sys; s = u.find_spec(sys.argv[1]); print(s.submodule_search_locations[0] if s else '')" $pkg 2>/dev/null || true)
        case $dir in ""|/tmp/site/*) ;; *) mv "$dir" /tmp/hidden-packages/ && echo "hid $dir" ;; esac
      done ;;
    weights)
      nvidia-smi -L
      python3 -c "import torch, diffusers, transformers, numpy; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
      [ -f /tmp/flux1-dev-random/model_index.json ] || python3 -m bench.random_weights --out /tmp/flux1-dev-random --device cuda
      mkdir -p weights && ln -sfn /tmp/flux1-dev-random weights/FLUX.1-dev ;;
    bench-a)
      $bench --paths diffusers-before,exact,fast-nofp8 --out "$out/fast-path.md"
      cp /tmp/fast-path/*.log "$out/" 2>/dev/null || true ;;
    bench-b)
      $bench --paths fast,diffusers-after --out "$out/fast-path.md"
      cp /tmp/fast-path/rows.json "$out/fast-path-rows.json"
      for f in /tmp/fast-path/server-system-fast*.log; do tail -c 20000 "$f" > "$out/$(basename "$f")"; done ;;
    check)
      printf '%s\n' "a portrait photo of an elderly fisherman" "a street sign that reads SMART DIFFUSION" > /tmp/fast-path/prompts.txt
      python3 scripts/check_fast_path.py --model flux1-dev --system gpu-1 --prompts /tmp/fast-path/prompts.txt \
        --out /tmp/fast-path/check/fast-path-check.md || true
      cp /tmp/fast-path/check/fast-path-check.md "$out/" ;;
    splitcheck)
      if [ -d build/splitcheck ]; then
        (cd build/splitcheck && python3 run_one.py "$PWD/old" /tmp/o.pt && python3 run_one.py "$PWD/new" /tmp/n.pt \
          && python3 compare.py /tmp/o.pt /tmp/n.pt) 2>&1 | tail -20 | tee "$out/splitcheck.txt"
      else echo "build/splitcheck not carried"; fi ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
