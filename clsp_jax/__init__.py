"""clsp-jax: CLSP (contrastive language-speech pre-training) in JAX/Flax.

`clsp_jax.CLSP` (the inference model, `clsp_jax.inference.CLSP`) is imported on first use, so that importing
a jax-free module of the package (a config's `clsp_jax.data.config`, `clsp_jax.optim_config`) does not
import jax.
"""

__all__ = ["CLSP"]


def __getattr__(name: str):
    if name == "CLSP":
        from clsp_jax.inference import CLSP

        return CLSP
    raise AttributeError(f"module 'clsp_jax' has no attribute {name!r}")
