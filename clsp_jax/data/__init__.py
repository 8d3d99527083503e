"""Input pipeline: FCaps TFDS splits -> Grain iterators of bucketed, captioned, tokenised batches."""

from clsp_jax.data.pipeline import (
    EvalBatches,
    default_config,
    make_eval_batches,
    make_train_dataset,
    make_train_iterator,
)

__all__ = ["EvalBatches", "default_config", "make_eval_batches", "make_train_dataset", "make_train_iterator"]
