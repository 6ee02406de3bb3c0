#!/usr/bin/env bash
# The README's `havir explain` figures (docs/explain/), from the synthetic NSD: two subjects with
# different grids, each prepared with the default masks, the tiny Versatile Diffusion, a tiny run
# (seeded), then `havir explain` over both runs (gradients), and subject 1's activation patterns.
# About 2 minutes on 2 CPU cores.
# Usage: scripts/explain_figures.sh [WORK_DIR]   (needs `havir` on PATH, e.g. .venv/bin)
set -euo pipefail
work=${1:-explain-figures}
docs=$(cd "$(dirname "$0")/.." && pwd)/docs/explain
rm -rf "$work" && mkdir -p "$work" "$docs"
printf 'preset = "tiny"\nepochs = 20\nbatch_size = 32\nlearning_rate = 1e-3\nseed = 0\n' > "$work/train.toml"
havir synth-nsd --out "$work/nsd" --subject 1 --subject 4 --images 200 --seed 7
for subject in 1 4; do
  havir prepare --nsd-root "$work/nsd" --subject $subject --out "$work/data"
  havir features --data "$work/data" --subject $subject --vd tiny
  havir train --data "$work/data" --subject $subject --out "$work/run$subject" --vd tiny --config "$work/train.toml"
done
havir explain --run "$work/run1" --run "$work/run4" --out "$work/explain"
havir explain --run "$work/run1" --out "$work/patterns" --method patterns
cp "$work/explain/roi_shares.png" "$work/explain/subj01/structural_vae_latents.png" \
   "$work/explain/subj01/semantic_clip_text.png" "$docs/"
cp "$work/patterns/subj01/structural_vae_latents.png" "$docs/structural_vae_latents_patterns.png"
