#!/usr/bin/env bash
# Pack what a served run on an offline GPU machine (Python 3.12, x86_64) needs into .gpu-carry/, small
# enough to travel with the repository (the device tool's 64 MiB cap; the nvidia-pytriton wheel alone is 55 MB):
#   tritonserver-slim.tar.xz  tritonserver 2.51, the Python backend, the 3.12 stub and only the bundled
#                             libraries they link (ldd closure), laid out as the wheel installs them (~25 MB)
#   gpusite.tar.xz            diffusers/transformers and tritonclient (HTTP+gRPC) with their dependencies,
#                             installed for cp312 manylinux (~19 MB); grpcio, protobuf and tokenizers come
#                             with the GPU image (KINDS.md's package list). numpy 1.26.4 as pinned:
#                             the 2.51 backend stub's pybind11 misreads numpy 2 dtypes (a BYTES input of
#                             "ab.." arrives as its first byte repeated), and the GPU image has numpy 2
# On the GPU machine: scripts/gpu_served_bench.sh unpacks both into /tmp/site.
# The two archives (~50 MB) plus the tracked tree fit the cap only without the 20 MB of committed
# shapes-flux weights, which GPU runs do not use: leave them out of that copy of the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.gpu-carry
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo '/.gpu-carry/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$dest" "$work/wheels"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$work/wheels" "$@"; }

# 1. The server: only what bin/tritonserver, the Python backend and the 3.12 stub load.
dl nvidia-pytriton==0.7.0
mkdir -p "$work/wheel" && (cd "$work/wheel" && python3 -m zipfile -e "$work"/wheels/nvidia_pytriton-*.whl .)
tree=$work/wheel/pytriton/tritonserver
chmod +x "$tree/bin/tritonserver" "$tree/python_backend_stubs/3.12/triton_python_backend_stub"
libs=$work/wheel/nvidia_pytriton.libs
needed() { LD_LIBRARY_PATH=$libs ldd "$@" | awk '$3 ~ /nvidia_pytriton.libs/ {print $3}' | xargs -rn1 basename | sort -u; }
set_now=$(needed "$tree/bin/tritonserver" "$tree/backends/python/libtriton_python.so" "$tree/python_backend_stubs/3.12/triton_python_backend_stub")
while :; do  # transitive closure
  more=$(cd "$libs" && needed $set_now | sort -u)
  grown=$(printf '%s\n%s\n' "$set_now" "$more" | sort -u)
  [ "$grown" = "$set_now" ] && break
  set_now=$grown
done
slim=$work/slim
mkdir -p "$slim/pytriton/tritonserver/bin" "$slim/pytriton/tritonserver/backends/python" \
  "$slim/pytriton/tritonserver/python_backend_stubs/3.12" "$slim/nvidia_pytriton.libs"
cp "$tree/bin/tritonserver" "$slim/pytriton/tritonserver/bin/"
cp "$tree/backends/python/libtriton_python.so" "$tree/backends/python/triton_python_backend_utils.py" "$slim/pytriton/tritonserver/backends/python/"
cp "$tree/python_backend_stubs/3.12/triton_python_backend_stub" "$slim/pytriton/tritonserver/python_backend_stubs/3.12/"
for lib in $set_now; do cp "$libs/$lib" "$slim/nvidia_pytriton.libs/"; done
tar -C "$slim" -cf - . | xz -9 -T0 > "$dest/tritonserver-slim.tar.xz"

# 2. The Python packages the GPU image lacks, at the versions requirements.txt pins.
rm -f "$work"/wheels/*
dl diffusers==0.42.1 transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 \
   click==8.5.1 truststore==0.10.5 importlib_metadata==10.2.0 \
   tritonclient==2.73.0 python-rapidjson==1.25 gevent==26.9.0 geventhttpclient==2.6.1 greenlet==3.3.2 \
   zope.event==6.2 zope.interface==8.7 brotli==1.2.1 numpy==1.26.4
python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" --python-version 3.12 --implementation cp \
  --only-binary=:all: --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 "$work"/wheels/*.whl
find "$work/site/numpy" -name tests -type d -prune -exec rm -rf {} +
tar -C "$work/site" -cf - . | xz -9 -T0 > "$dest/gpusite.tar.xz"
du -sh "$dest"/*
