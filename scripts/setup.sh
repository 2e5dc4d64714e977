#!/usr/bin/env bash
# Install seqshard into the current Python environment.
#   scripts/setup.sh         the package (for the demo)
#   scripts/setup.sh --dev   the package and the test tools
# torch: an installed torch is kept (so a GPU machine keeps its CUDA build). With no torch and
# no GPU we install the CPU build of torch, never the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extra=""; [ "${1:-}" = "--dev" ] && extra="[dev]"

if "$PY" -c "import torch" 2>/dev/null; then
    echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.11"
else
    # The CPU wheel index, when this machine can reach it; otherwise the pip configuration must
    # already provide a CPU build (as on our CI machines, where torch==2.13.0 is the local CPU wheel).
    if "$PY" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
        "$PY" -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
    else
        "$PY" -m pip install -q "torch==2.13.0"
    fi
fi
"$PY" -m pip install -q -e ".$extra"

# --dev: tests/test_plan_html.py screenshots the plan page in headless Chromium (Debian's
# chromium package, with a font). Without apt (or root/sudo) the test skips its screenshot.
if [ -n "$extra" ] && ! { command -v chromium || command -v chromium-browser; } >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" != 0 ] && sudo="sudo -n"
    if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || sudo -n true 2>/dev/null; }; then
        echo "setup: installing chromium with apt-get (for tests/test_plan_html.py)"
        { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
              --no-install-recommends chromium fonts-dejavu-core; } >/dev/null \
            || echo "setup: could not install chromium; tests/test_plan_html.py will skip its screenshot"
    else
        echo "setup: no chromium and no apt-get as root; tests/test_plan_html.py will skip its screenshot"
    fi
fi
