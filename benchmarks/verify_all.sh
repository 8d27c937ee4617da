#!/usr/bin/env bash
# Run `caffe2torch verify` on every reference net (free-running; isolated where full tensors exist)
# and print each one's summary and worst layer. Usage: benchmarks/verify_all.sh [REFERENCE_DIR]
set -u
ref=${1:-"$(dirname "$0")/../../shared/reference"}
status=0
run() {
    local out
    out=$(caffe2torch verify "$@" 2>&1) || status=1
    printf '%s\n' "$out" | grep -E '^(worst|final argmax|[0-9]+/[0-9]+ layers)' | sed 's/^/    /'
}
for proto in "$ref"/units/unit_*.prototxt; do
    name=$(basename "$proto" .prototxt)
    echo "$name"
    run "$ref/units/$name.caffemodel" --prototxt "$proto" --reference "$ref/units/$name.ref.h5" --tolerance 1e-5
    run "$ref/units/$name.caffemodel" --prototxt "$proto" --reference "$ref/units/$name.ref.h5" --isolated
done
echo icnet_merged_1025x2049
run "$ref/icnet_merged_1025x2049.caffemodel" --prototxt "$ref/icnet_cityscapes.prototxt" --reference "$ref/icnet_merged_1025x2049.ref.h5"
echo icnet_bnnomerge_1025x2049
run "$ref/icnet_bnnomerge_1025x2049.caffemodel" --prototxt "$ref/icnet_cityscapes_bnnomerge.prototxt" --reference "$ref/icnet_bnnomerge_1025x2049.ref.h5"
echo icnet_merged_257x513
run "$ref/icnet_merged_1025x2049.caffemodel" --prototxt "$ref/icnet_merged_257x513.prototxt" --reference "$ref/icnet_merged_257x513.ref.h5"
run "$ref/icnet_merged_1025x2049.caffemodel" --prototxt "$ref/icnet_merged_257x513.prototxt" --reference "$ref/icnet_merged_257x513.ref.h5" --isolated
exit $status
