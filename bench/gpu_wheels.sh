#!/usr/bin/env bash
# Wheels of what `python -m bench.gpu_check` needs beyond torch / torchaudio / einops / tensorboard /
# scikit-learn, for a GPU machine that cannot reach a package index (CPython 3.12, x86-64 Linux).
#
#   bench/gpu_wheels.sh [DIR]        # here, with network: fills DIR (default .whl)
#   pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site   # there
#
# DeepSpeed publishes no wheel: it is built here from its source (pure Python, no compiled ops).
set -euo pipefail
out="${1:-.whl}"
py="${PYTHON:-python3}"
mkdir -p "$out"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
# versions as the development environment pins or resolves them (setup.py); the rest are their needs, also those
# a GPU image usually has (intervaltree's sortedcontainers, cytoolz's toolz, DeepSpeed's msgpack / psutil / tqdm,
# timm's safetensors, lhotse's click / tabulate / pyyaml): the machine may have none of them
for pkg in lhotse==1.33.0 soundfile==0.14.0 cffi pycparser audioread cytoolz intervaltree lilcom \
           timm==1.0.31 hjson pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
           typing_extensions sortedcontainers==2.4.0 toolz==1.2.0 tabulate==0.10.0 click==8.5.1 msgpack==1.2.4 \
           psutil==7.2.2 tqdm==4.70.1 safetensors==0.8.0 pyyaml==6.0.4; do
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "$pkg"
done
"$py" -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8 ||
  "$py" -m pip wheel --quiet --no-deps -w "$out" deepspeed==0.19.8
ls -1 "$out"
du -sh "$out"
