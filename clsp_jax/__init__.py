"""clsp-jax: CLSP (contrastive language-speech pre-training) in JAX/Flax.

`clsp_jax.CLSP` (the inference model, `clsp_jax.inference.CLSP`) is imported on first use, so that importing
a jax-free module of the package (a config's `clsp_jax.data.config`, `clsp_jax.optim_config`) does not
import jax.

Importing the package also sets one XLA:CPU flag (`prefer_eigen_dots`), before JAX starts its backends.
"""

import os
from importlib import metadata

__all__ = ["CLSP"]

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def prefer_eigen_dots(env=os.environ) -> bool:
    """Adds `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS in `env`; returns whether it did.

    jaxlib 0.10's XLA:CPU hands matmuls and the elementwise work around them to YNNPACK. On these networks'
    matmuls ([tokens, 384..768] by [384..3072]) inside whole programs, its plain Eigen matmuls are faster: the
    text tower's forward by about a quarter, a training step by a few percent (BENCHMARKS.md §9). XLA reads
    its flags once, when JAX's first backend starts, so this runs on import and does nothing after that.

    Left alone: XLA_FLAGS that already set the flag, CLSP_KEEP_XLA_FLAGS=1, and jaxlib other than 0.10.x
    (XLA aborts on a flag it does not know, and 0.10 is the series this was measured on).
    """
    if env.get("CLSP_KEEP_XLA_FLAGS") == "1" or YNN_FLAG in env.get("XLA_FLAGS", ""):
        return False
    try:
        if not metadata.version("jaxlib").startswith("0.10."):
            return False
    except metadata.PackageNotFoundError:
        return False
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --{YNN_FLAG}=".strip()
    return True


prefer_eigen_dots()


def __getattr__(name: str):
    if name == "CLSP":
        from clsp_jax.inference import CLSP

        return CLSP
    raise AttributeError(f"module 'clsp_jax' has no attribute {name!r}")
