#!/usr/bin/env bash
# Build ./.whl-unsloth: what benchmarks/unsloth_peer.py needs on the GPU machine beside .whl (transformers,
# tokenizers, huggingface-hub, peft, bitsandbytes from ../shared/device/wheelhouse.sh), for Python 3.12.
# Unsloth pins trl <= 1.15 and datasets < 5 (ours: 1.16, 5.0.1), so it installs into a site folder of its own.
# Its wheel (28.6 MB) is mostly the "studio" web app (80 MB unpacked); the training code (unsloth/, 7 MB) is kept
# and the rest dropped, so both folders fit one 64 MiB device call (~24 MB + ~22 MB). xformers is left out:
# Unsloth falls back to PyTorch's attention without it (unsloth/models/_utils.py, ModuleNotFoundError).
#
#   bash benchmarks/unsloth_wheels.sh     # then carry [".whl", ".whl-unsloth"]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl-unsloth/' .git/info/exclude 2>/dev/null || echo '/.whl-unsloth/' >> .git/info/exclude
rm -rf .whl-unsloth && mkdir -p .whl-unsloth
PKGS=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.3.0 torchao==0.18.0 tyro==1.0.17
      docstring-parser typeguard shtab msgspec cut_cross_entropy==25.1.1 structlog json5 typer shellingham
      hf_transfer diffusers==0.42.1 sentencepiece nest-asyncio "certifi>=2026.10.19" einops rich markdown-it-py
      mdurl pygments importlib_metadata zipp)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl-unsloth "${PKGS[@]}"
python3 - <<'PY'
import glob, os, zipfile
src = glob.glob(".whl-unsloth/unsloth-2*.whl")[0]
tmp = src + ".tmp"
keep = lambda n: not n.startswith("studio/")
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
    for item in zi.infolist():
        if not keep(item.filename):
            continue
        data = zi.read(item.filename)
        if item.filename.endswith("RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if keep(l.split(b",")[0].decode()))
        zo.writestr(item, data)
os.replace(tmp, src)
PY
du -sh .whl-unsloth
