"""clsp-jax: JAX/Flax training for CLSP (contrastive language-speech pre-training)."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.0,<4.10",
    "array-record>=0.8,<0.9",
    "librosa>=0.11,<0.12",
    "soxr>=0.5,<2",
    "soundfile>=0.13,<0.15",
    "ml-collections>=1.0,<2",
    "tokenizers>=0.21,<0.24",
    "safetensors>=0.5,<0.9",
    "numpy>=1.26,<3",
    "espeakng-loader>=0.2.4,<0.3",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
]

setup(
    name="clsp-jax",
    version="0.1.0",
    description="JAX/Flax CLSP: contrastive language-speech pre-training with global and fine-grained captions",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["clsp_jax", "clsp_jax.*", "data_prep", "data_prep.*", "configs", "benchmarks"]),
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # Parity checks and weight conversion against the authors' PyTorch network only; never core.
        "parity": ["torch==2.13.0", "transformers>=4.50,<6"],
        "beam": ["apache-beam>=2.60,<3"],
    },
)
