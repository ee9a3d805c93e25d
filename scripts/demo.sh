#!/usr/bin/env bash
# `make demo`: the whole smadlrp workflow on the embedded synthetic data set (generated once into its cache,
# ~/.cache/smadlrp). Everything is written below OUT (default: demo/); a previous demo there is replaced. It ends
# by writing the figures the docs quote into OUT/demo-figures.json and OUT/docs-images/, and by printing its
# headline figures beside the committed ones; `make docs-figures` copies them into docs/ (scripts/demo_figures.py).
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

# One machine, one result: the commands are seeded, and a fixed thread count fixes how float sums are split (on CPU
# the kernels then repeat exactly). Other machines give other figures (README.md, "The main commands").
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2

start=$SECONDS
echo "== 1. fine-tune the compact VGG from random initialisation (every layer trains)"
"$smadlrp" finetune --full --arch vgg_compact --image-size 64 --epochs 20 --batch-size 32 --lr 2e-3 \
  --weights none --out "$out/run"

echo "== 2. evaluate on the test split, threshold fixed at the validation split's D-EER"
"$smadlrp" evaluate --checkpoint "$out/run/best.safetensors" --threshold val-eer \
  --det "$out/det.png" --json "$out/evaluate.json" --markdown "$out/evaluate.md" --scores "$out/scores.csv"

echo "== finetune + evaluate took $((SECONDS - start)) s"

echo "== 3. fit PatternNet / PatternAttribution patterns on training images"
"$smadlrp" fit-patterns --checkpoint "$out/run/best.safetensors" --kind both --max-images 512 \
  --out "$out/patterns.safetensors"

echo "== 4. explain a few test images with every rule, and trace one"
python="$(dirname "$smadlrp")/python"
data=$("$python" -c "from smadlrp.data.synthetic.generator import default_dataset_dir; print(default_dataset_dir())")
morphs=("$data"/test/morph/*.png)
bonafide=("$data"/test/bonafide/*.png)
images=("${morphs[@]:0:3}" "${bonafide[0]}")
"$smadlrp" explain "${images[@]}" --checkpoint "$out/run/best.safetensors" --rule all \
  --patterns "$out/patterns.safetensors" --out "$out/explain"
"$smadlrp" trace "${images[0]}" --checkpoint "$out/run/best.safetensors" \
  --rule epsilon-gamma-box --out "$out/trace"

echo "== 5. compare every rule with the baselines: localisation, faithfulness, time"
start=$SECONDS
"$smadlrp" compare-rules --checkpoint "$out/run/best.safetensors" --patterns "$out/patterns.safetensors" \
  --max-images 100 --impute mean --out "$out/compare" --json "$out/compare.json"
echo "== compare-rules took $((SECONDS - start)) s"
if [ "${SMADLRP_DEMO_SANITY:-0}" = 1 ]; then  # `make docs-figures`: the sanity checks too (several minutes)
  start=$SECONDS
  "$smadlrp" compare-rules --checkpoint "$out/run/best.safetensors" --patterns "$out/patterns.safetensors" \
    --max-images 48 --sanity --out "$out/sanity" --json "$out/sanity.json"
  echo "== compare-rules --sanity took $((SECONDS - start)) s"
fi

echo "== 6. the examples of docs/explain.md (output captured at 80 columns)"
complete=("$data"/test/morph/complete_*.png)
COLUMNS=80 "$smadlrp" explain "${complete[0]}" "${bonafide[0]}" --checkpoint "$out/run/best.safetensors" \
  --rule epsilon --rule epsilon-plus-flat --out "$out/explain-example" | tee "$out/explain-example.txt"
COLUMNS=80 "$smadlrp" trace "${complete[0]}" --checkpoint "$out/run/best.safetensors" --rule epsilon-plus \
  --out "$out/trace-example" | tee "$out/trace-example.txt"

echo "== 7. the figures the docs quote: $out/demo-figures.json and $out/docs-images/ (make docs-figures publishes them)"
mkdir -p "$out/docs-images"
cp "$out/explain/morph__$(basename "${images[0]}" .png).grid.png" "$out/docs-images/demo-grid.png"
cp "$out/compare/perturbation-curves.png" "$out/docs-images/compare-perturbation-curves.png"
if [ -d "$out/sanity" ]; then
  cp "$out/sanity/perturbation-curves.png" "$out/docs-images/compare-road-curves.png"
  cp "$out/sanity/randomisation.png" "$out/docs-images/compare-randomisation.png"
fi
"$python" "$(dirname "$0")/demo_figures.py" "$out"

echo "== 8. one self-contained HTML page of the whole run"
"$smadlrp" report "$out" --out "$out/report.html" --explain-errors 3

echo "== done: results in $out/"
