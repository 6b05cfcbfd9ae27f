#!/usr/bin/env bash
# The wheels sweeps/gpu.sh needs on the device machine beyond its image (which has torch,
# lightning, transformers, peft, accelerate, pyarrow, ...: /work/.library/device/KINDS.md), for its
# Python 3.12, into .whl/ (git-ignored); the device call then carries .whl. The versions are this
# project's venv's (TRL: the version of the cross-checks, for the vs_trl step). About 2 MB in all;
# the checkout itself must leave room for them (tests/test_gpu_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."
pip=${PIP:-python3 -m pip}
$pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8 omegaconf==2.3.1 trl==1.16.0
# omegaconf's parser runtime is published as a source package only: built here (pure Python)
$pip wheel --no-deps -q -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
