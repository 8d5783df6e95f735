from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minigpt",
    version="0.1.0",
    description="A GPT from scratch in PyTorch with its own Triton kernels (FlashAttention, LayerNorm, GELU)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["minigpt", "minigpt.*", "kernels", "kernels.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        "torch>=2.11",
        "numpy",
        "tiktoken",
        "datasets",
        "matplotlib",
        "tqdm",
        "safetensors",  # GPT-2's weights (GPTModel.from_pretrained), read without unpickling
        "huggingface_hub",  # downloads them (imported only when a hub name is asked for)
        'triton>=3.6; platform_system == "Linux"',
    ],
    extras_require={
        # transformers: the reference GPT-2 in the tests. Below 5.25: from 5.25 on it requires Hugging Face's own
        # `kernels` package and imports it, and our top-level `kernels` package takes that name first
        "test": ["pytest", "transformers<5.25", "safetensors",
                 "nbclient", "nbformat", "ipykernel"],  # run notebooks/tour.ipynb (tests/test_notebook.py)
        "tensorboard": ["tensorboard"],
    },
    entry_points={
        "console_scripts": [
            "minigpt-train=minigpt.train:main",
            "minigpt-generate=minigpt.generate:main",
        ],
    },
)
