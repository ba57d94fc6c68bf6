from setuptools import find_packages, setup

setup(
    name="fusion-train",
    version="0.1.0",
    description="Distributed pretraining of Chameleon-style early-fusion mixed-modal models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fusion_train", "fusion_train.*", "data_pipelines", "data_pipelines.*"]),
    # Ranges here; the versions `make install` verified together are pinned in constraints.txt.
    install_requires=[
        "torch>=2.5",
        "deepspeed>=0.16",
        "sentencepiece>=0.2",
        "webdataset>=0.2.90",
        "wandb>=0.18",
        "hydra-core>=1.3",
        "torchdata>=0.10",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "xxhash>=3",  # shard hashes
        "numpy>=1.26",
        "pyyaml>=6",
        "pillow>=10",
        "matplotlib>=3.8",  # fusion-report
        "soundfile>=0.12",  # wav, flac, ogg (and mp3) through libsndfile, bundled in its wheel
        "av>=12",  # PyAV: FFmpeg's decoders for what libsndfile cannot read (m4a, opus, mp3 variants)
        "soxr>=0.3",  # high-quality resampling to the audio tokenizer's rate
        "pyarrow>=14",  # parquet inputs: the Cauldron and HF datasets' exports
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "transformers>=4.45",
            "hypothesis>=6",
            "tensorboard>=2.15",
            "import-linter>=2.1",
            "pytest-xdist>=3.5",
            "playwright>=1.45",  # the human-evaluation page, clicked in headless Chromium
            "lm-eval>=0.4.4",
            "accelerate>=0.26",  # lm-eval's HF backend, the reference our model class is checked against
            "pycocoevalcap>=1.2",
        ],
        # fusion-eval lm-harness / caption / vqa
        "eval": ["lm-eval>=0.4.4", "pycocoevalcap>=1.2"],
        "tensorboard": ["tensorboard>=2.15"],
        "gpu": ["liger-kernel>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "fusion-convert=fusion_train.commands.convert:main",
            "fusion-data=fusion_train.commands.data:main",
            "fusion-train=fusion_train.commands.train:main",
            "fusion-generate=fusion_train.commands.generate:main",
            "fusion-report=fusion_train.commands.report:main",
            "fusion-eval=fusion_train.commands.eval:main",
        ]
    },
)
