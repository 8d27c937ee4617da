#!/usr/bin/env bash
# Copy the reference files the GPU run needs into gpu-ref/ (git-ignored; 44 MB, under the device tool's 64 MiB carry).
# Then, through the device tool: run(command="bash benchmarks/gpu_session.sh", carry=["gpu-ref"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
source=${1:-../shared/reference}
mkdir -p gpu-ref
for file in icnet_merged_1025x2049.caffemodel icnet_cityscapes.prototxt icnet_merged_257x513.prototxt \
            icnet_merged_1025x2049.ref.h5; do
    cp "$source/$file" gpu-ref/
done
du -sh gpu-ref
