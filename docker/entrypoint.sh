#!/usr/bin/env bash
# Container entrypoint (docker/Dockerfile, docker/k8s/deployment.yaml): writes the Triton repository for
# MODEL / SYSTEM (configs/models, configs/system), then execs tritonserver with the container's
# arguments (e.g. --model-control-mode=explicit --exit-timeout-secs=100).
#
# exec, so that tritonserver replaces this shell as the direct child of tini (PID 1): the SIGTERM of
# `docker stop` or of the kubelet, forwarded by tini, reaches Triton itself, which drains in-flight
# requests for up to --exit-timeout-secs, unloads the models (stubs exit, their /dev/shm regions go)
# and exits. tini also reaps processes orphaned inside the container. The runtime's grace before SIGKILL
# (docker stop -t / --stop-timeout, terminationGracePeriodSeconds) must exceed --exit-timeout-secs.
set -euo pipefail

# The base image's own entrypoint (banner, CUDA compatibility setup) first; it execs this script again.
if [[ -z "${SMART_DIFFUSION_NVIDIA_ENTRYPOINT:-}" && -x /opt/nvidia/nvidia_entrypoint.sh ]]; then
    export SMART_DIFFUSION_NVIDIA_ENTRYPOINT=1
    exec /opt/nvidia/nvidia_entrypoint.sh "$0" "$@"
fi

repository="${MODEL_REPOSITORY:-/tmp/repo}"
python3 -c 'import sys; from smart_diffusion_backend.repository import write_repository as w; w(sys.argv[1], sys.argv[2].split(","), sys.argv[3])' \
    "$repository" "${MODEL:-tiny-flux}" "${SYSTEM:-cpu}"
exec tritonserver --model-repository="$repository" "$@"
