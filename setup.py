from setuptools import find_packages, setup

setup(
    name="vlrm",
    version="0.1.0",
    description="Train and evaluate reward models for vision-language models (Qwen2/2.5/3-VL, Qwen3.5, MiMo-VL, any image-text-to-text model).",
    packages=find_packages(include=["vlrm", "vlrm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6,<=2.14.1",
        "torchvision",
        "transformers>=5.24,<6",  # vlrm.layout.attention.MIN_TRANSFORMERS
        "trl>=1.0,<2",
        "accelerate>=1.4",
        "peft>=0.18",
        "datasets>=4.0",  # datasets.List (the canonical features)
        "qwen-vl-utils>=0.0.13",  # VIDEO_MIN_TOKEN_NUM, MODEL_SEQ_LEN and the rest vlrm.data.videos reads
        "av>=12",  # PyAV: video decoding with FFmpeg inside its wheel (vlrm.data.videos)
        "pyyaml",
        "pandas",
        "pillow",
        "safetensors",
        "matplotlib",
        "tqdm",
        "fastapi",
        "uvicorn",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "ruff", "deepspeed>=0.16", "hypothesis", "tensorboard"],
        "gpu": ["flash-attn>=2.6", "deepspeed>=0.16"],
    },
)
