#!/usr/bin/env bash
# Wheels for the device image (Python 3.12, x86_64, no network there) of what it lacks and pathopeft needs:
# openslide (python + the C library as a wheel), imagecodecs, monai, albumentations + albucore, jsonargparse
# and their small pure-Python dependencies. Written to .whl/ (git-ignored); benchmarks/gpu.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --implementation cp -d .whl \
  openslide-python openslide-bin imagecodecs monai albumentations albucore jsonargparse docstring-parser \
  typeshed-client pydantic pydantic-core annotated-types typing-inspection stringzilla simsimd
ls -la .whl
