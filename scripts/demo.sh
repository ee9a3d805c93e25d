#!/usr/bin/env bash
# `make demo`: the whole smadlrp workflow on the embedded synthetic data set (generated once into its cache).
# Everything is written below OUT (default: demo/); a previous demo there is replaced.
set -euo pipefail
out=${1:-demo}
smadlrp="$(dirname "$0")/../.venv/bin/smadlrp"

if [ -e "$out" ] && [ ! -f "$out/.smadlrp-demo" ]; then
  echo "error: $out exists and was not made by the demo; pass another folder: make demo DEMO=folder" >&2
  exit 2
fi
rm -rf "$out"
mkdir -p "$out"
touch "$out/.smadlrp-demo"

start=$SECONDS
echo "== 1. fine-tune the compact VGG from random initialisation (every layer trains)"
"$smadlrp" finetune --full --arch vgg_compact --image-size 64 --epochs 20 --batch-size 32 --lr 2e-3 \
  --weights none --out "$out/run"

echo "== 2. evaluate on the test split, threshold fixed at the validation split's D-EER"
"$smadlrp" evaluate --checkpoint "$out/run/best.safetensors" --threshold val-eer \
  --det "$out/det.png" --json "$out/evaluate.json" --markdown "$out/evaluate.md"

echo "== finetune + evaluate took $((SECONDS - start)) s"

echo "== 3. fit PatternNet / PatternAttribution patterns on training images"
"$smadlrp" fit-patterns --checkpoint "$out/run/best.safetensors" --kind both --max-images 512 \
  --out "$out/patterns.safetensors"

echo "== 4. explain a few test images with every rule, and trace one"
data=$("$(dirname "$smadlrp")/python" -c "from smadlrp.data.synthetic.generator import default_dataset_dir; print(default_dataset_dir())")
morphs=("$data"/test/morph/*.png)
bonafide=("$data"/test/bonafide/*.png)
images=("${morphs[@]:0:3}" "${bonafide[0]}")
"$smadlrp" explain "${images[@]}" --checkpoint "$out/run/best.safetensors" --rule all \
  --patterns "$out/patterns.safetensors" --out "$out/explain"
"$smadlrp" trace "${images[0]}" --checkpoint "$out/run/best.safetensors" \
  --rule epsilon-gamma-box --out "$out/trace"

echo "== done: results in $out/"
