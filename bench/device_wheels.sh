#!/usr/bin/env bash
# Wheels the GPU machines lack, gathered into .carry/wheels (git-ignored) to pass as `carry` to the device
# tool. Their image has torch 2.11 (cu130), transformers 5.17 and Python 3.12; we need transformers 5.24
# (boolean logits_to_keep masks; the PIL GotOcr2 processor), its hub client, deepspeed (sdist only on PyPI:
# built here without ops), the server's starlette/uvicorn, and Liger's Triton kernels (pure Python). On the
# device, first thing in every call:
#   python3 -m pip install -q --no-deps .carry/wheels/*.whl
#
# .carry/msswift holds ms-swift 4.6.0 (the second training baseline) and what it imports for `swift sft` on
# an InternVL model that the image lacks. ms-swift declares transformers<5.20 and peft<0.21, so it brings
# its own transformers 5.17 (the image's version; 5.17 refuses huggingface_hub 2.x at import, hence hub
# 1.33) and peft 0.20, installed into a folder of their own that only its process puts first on PYTHONPATH
# (bench/msswift_baseline.py --swift_site); the system keeps .carry/wheels' transformers 5.24 for ours:
#   python3 -m pip install -q --no-deps --target /tmp/swift-site .carry/msswift/*.whl
# The rest of the list is what a CPU run of `swift sft` (LoRA and full, InternVL-HF layout) imported, less
# the image's packages (device README's package list); modelscope_hub imports cryptography unconditionally.
# Pip skips files already downloaded, so the script can be rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
out=.carry/wheels
mkdir -p "$out"
$PIP download -q --no-deps -d "$out" transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore hjson pydantic==2.14.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5 starlette uvicorn sniffio liger-kernel==0.8.5
$PIP download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$out" pydantic-core==2.50.5 uvloop==0.23.0 httptools==0.9.0
if ! ls "$out"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w "$out" deepspeed
fi
swift=.carry/msswift
mkdir -p "$swift"
# multiprocess publishes one pure-Python wheel per Python version: ask for 3.12's.
$PIP download -q --no-deps --python-version 3.12 --only-binary=:all: -d "$swift" ms-swift==4.6.0 modelscope==1.40.2 \
    modelscope-hub==0.5.1 datasets==4.8.4 dill==0.4.1 multiprocess==0.70.19 trl==0.29.1 json-repair==0.64.6 \
    peft==0.20.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 pycparser==3.12 \
    transformers==5.17.0 huggingface_hub==1.33.0
$PIP download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 -d "$swift" pydantic-core==2.50.5 cryptography==50.0.2 cffi==2.1.1
ls -la "$out" "$swift"
du -sh .carry  # the device tool carries at most 64 MiB in all
