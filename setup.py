"""Coarse-to-fine training for audio spectrogram transformers (SSAST pretraining + AST fine-tuning)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# one version, which a run records in its ledger (common/system/version.py: read, the package is not installed yet)
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "common" / "system" / "version.py").read_text(), re.M)[1]

setup(
    name="coarse2fine-ast",
    version=VERSION,
    description=(
        "Efficient coarse-to-fine training of audio spectrogram transformers: SSAST pretraining "
        "and supervised fine-tuning on time-compressed spectrograms (Feng et al., ICASSP 2024)."
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    # POSIX only (fcntl locks, SIGUSR1, O_NOFOLLOW): on Windows, WSL; on macOS the CPU (README)
    classifiers=["Operating System :: POSIX :: Linux", "Operating System :: MacOS",
                 "License :: OSI Approved :: BSD License", "Programming Language :: Python :: 3"],
    packages=find_packages(include=["common", "common.*", "pretrain", "finetune"]),
    package_data={"common.models.htsat": ["audioset_labels.csv"]},
    # the recipes, by name for --recipe (common.config.recipe.bundled_recipes) where the package is installed
    data_files=[("share/coarse2fine-ast/recipes", sorted(f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml"))
                 ), ("share/coarse2fine-ast/examples", ["examples/onnx_classify.py"])],  # what c2f-onnx points to
    license_files=["LICENSE", "NOTICE"],  # NOTICE: the AudioSet class list (CC BY-SA 4.0)
    install_requires=[
        # torchaudio 2.11 only loads with the matching torch build: keep the three pinned together.
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "torchvision==0.26.0",
        "timm>=1.0.31",  # PI-resize with torch.linalg.pinv (1.0.16); non-square Swin bias-table resize (1.0.31)
        "einops>=0.7",
        "lhotse>=1.33,<1.34",
        "urllib3",  # lhotse 1.33 imports it without declaring it
        "deepspeed>=0.19.8,<0.20",
        "scikit-learn>=1.3",
        "tensorboard>=2.14",
        "soundfile>=0.12",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5"],
        # Hugging Face interop (common/models/hf.py, hf_export.py): export to / classify with transformers' AST classes
        "hf": ["transformers>=4.30"],
        # ONNX export (finetune/onnx_export.py) and the torch-free example (examples/onnx_classify.py)
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
    },
    entry_points={
        "console_scripts": [
            "c2f-corpora=common.data.corpora.__main__:main",
            "c2f-pretrain=pretrain.run:main",
            "c2f-finetune=finetune.run:main",
            "c2f-linear-probe=finetune.linear_probe:main",
            "c2f-report=common.reports.report:main",
            "c2f-predict=finetune.predict:main",
            "c2f-evaluate=finetune.evaluate:main",
            "c2f-embed=finetune.embed:main",
            "c2f-hf=common.models.hf_export:main",
            "c2f-onnx=finetune.onnx_export:main",
        ]
    },
)
