#!/usr/bin/env bash
# Wheels the GPU machines lack, gathered into .carry/wheels (git-ignored) to pass as `carry` to the device
# tool. Their image has torch 2.11 (cu130), transformers 5.17 and Python 3.12; we need transformers 5.24
# (boolean logits_to_keep masks; the PIL GotOcr2 processor), its hub client, deepspeed (sdist only on PyPI:
# built here without ops), and the server's starlette/uvicorn. On the device, first thing in every call:
#   python3 -m pip install -q --no-deps .carry/wheels/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
out=.carry/wheels
mkdir -p "$out"
$PIP download -q --no-deps -d "$out" transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore hjson pydantic==2.14.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5 starlette uvicorn sniffio
$PIP download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d "$out" pydantic-core==2.50.5
if ! ls "$out"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 $PIP wheel -q --no-deps --no-build-isolation -w "$out" deepspeed
fi
ls -la "$out"
