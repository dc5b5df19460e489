#!/usr/bin/env bash
# Fetch the pretrained weights the paper recipe starts from (needs internet):
#   checkpoints/sam2.1_hiera_base_plus.pt   SAM 2.1 Hiera-B+ ({"model": state_dict}; image encoder is reused)
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

fetch https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_base_plus.pt sam2.1_hiera_base_plus.pt

mkdir -p bert-base-uncased
for f in config.json model.safetensors vocab.txt tokenizer_config.json tokenizer.json; do
  fetch "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/$f" "bert-base-uncased/$f"
done
echo "done."
