"""clsp-jax: CLSP (contrastive language-speech pre-training) in JAX/Flax."""

from clsp_jax.inference import CLSP

__all__ = ["CLSP"]
