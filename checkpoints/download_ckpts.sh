#!/usr/bin/env bash
# Fetch the pretrained weights the paper recipe starts from (needs internet):
#   checkpoints/sam2.1_hiera_{tiny,small,base_plus,large}.pt   SAM 2.1 ({"model": state_dict}; image encoder is reused)
#   checkpoints/bert-base-uncased/          Hugging Face BERT directory (config.json, model.safetensors, vocab.txt)
# Offline? Copy these files here by hand; see checkpoints/README.md.
set -euo pipefail
cd "$(dirname "$0")"

fetch() {  # fetch URL DEST
  local url=$1 dest=$2
  if [[ -s "$dest" ]]; then echo "exists: $dest"; return; fi
  echo "downloading $url -> $dest"
  if command -v wget >/dev/null; then wget -q --show-progress -O "$dest.part" "$url"
  else curl -fL --progress-bar -o "$dest.part" "$url"; fi
  mv "$dest.part" "$dest"
}

# SAM 2.1 image encoders: base_plus for the paper recipe (configs/rsam_b+_b.yaml), the others for
# configs/rsam_{t,s,l}_b.yaml. Pass sizes to fetch only those: bash download_ckpts.sh base_plus tiny
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(tiny small base_plus large)
for size in "${sizes[@]}"; do
  case $size in tiny|small|base_plus|large) ;; *) echo "unknown size: $size (tiny small base_plus large)" >&2; exit 2;; esac
  fetch "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_${size}.pt" "sam2.1_hiera_${size}.pt"
done

mkdir -p bert-base-uncased
for f in config.json model.safetensors vocab.txt tokenizer_config.json tokenizer.json; do
  fetch "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/$f" "bert-base-uncased/$f"
done
echo "done."
