#!/usr/bin/env bash
# The smol recipe end to end (README: "Start from pre-trained weights"): SmolLM2-135M-Instruct and a
# ViT from our CLIP stage, pre-trained on ../shared/data's real captions, web documents and text mixed
# with the synthetic world, then SFT, then COCO captioning (0/4/8 shots) and WikiText-2 perplexity of
# the base model and of pre-training with and without the 10% text-only data. About 30 minutes on 2
# CPU cores. OUT (default runs/smol) holds every run and evaluation; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
MM1=${MM1:-mm1}
OUT=${OUT:-runs/smol}
WEIGHTS=runs/weights/smollm2-135m-instruct
WORLD=runs/data/world
SHARED=${MM1_SHARED_DATA:-../shared/data}
WIKI="$SHARED/wikitext2_tokenized/valid.txt"
PPL=(eval.ppl_tokens=8192 eval.ppl_window=1024)

[ -f "$WEIGHTS/model.safetensors" ] || $MM1 weights from-gguf --out "$WEIGHTS"
[ -f "$WORLD/world.json" ] || $MM1 data synth --recipe smol --out "$WORLD"
# clip → pretrain (and pretrain_no_text) → sft, each from the stages before it (recipes/smol.py: smol_pipeline)
$MM1 pipeline smol --out "$OUT" --jobs 2

$MM1 eval --checkpoint "$WEIGHTS" --tasks "ppl:$WIKI" --out "$OUT/eval_base" "${PPL[@]}"
$MM1 eval --checkpoint "$OUT/pretrain" --tasks "coco_val2017,ppl:$WIKI" --out "$OUT/eval_pretrain" "${PPL[@]}"
$MM1 eval --checkpoint "$OUT/pretrain_no_text" --tasks "ppl:$WIKI" --out "$OUT/eval_pretrain_no_text" "${PPL[@]}"
$MM1 eval --checkpoint "$OUT/sft" --tasks coco_val2017 --out "$OUT/eval_sft"
$MM1 generate --checkpoint "$OUT/sft" --image "$SHARED/coco_mini/val2017/000000000139.jpg" \
    --prompt "Provide a one-sentence caption for the provided image."
