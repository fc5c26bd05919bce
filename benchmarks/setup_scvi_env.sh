#!/usr/bin/env bash
# Creates benchmarks/.scvi-venv with scvi-tools 1.4.2 beside torch 2.13.0 (the CPU build on our
# machines), kept apart from scvae's own environment: scvi-tools is never a dependency of scvae.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.scvi-venv"
test -x "$venv/bin/python" || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" install torch==2.13.0
# safetensors: step_equivalence.py imports scvae from the checkout beside scvi-tools
"${pip[@]}" install "scvi-tools==1.4.2" "pynndescent<0.7" scikit-misc igraph leidenalg "safetensors>=0.4"
"$venv/bin/python" -c "import scvi, torch; print('scvi-tools', scvi.__version__, 'torch', torch.__version__)"
