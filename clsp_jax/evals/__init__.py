"""Evaluation: the paper's metrics (metrics), evaluators for training and the CLI (evaluators; the linear
probe in probe), eval inputs read from manifests, audio files and ratings CSVs (sources), and the report laid
out like the paper's tables (report)."""

from clsp_jax.evals.evaluators import (
    NetEmbedder,
    RetrievalEvaluator,
    SimilarityEvaluator,
    ZeroShotEvaluator,
    ZeroShotTask,
    model_embed_fns,
    paper_task,
)
from clsp_jax.evals.sources import EvalClip, RatedPair, WaveformBatches, read_manifest, read_ratings

__all__ = ["EvalClip", "NetEmbedder", "RatedPair", "RetrievalEvaluator", "SimilarityEvaluator", "WaveformBatches",
           "ZeroShotEvaluator", "ZeroShotTask", "model_embed_fns", "paper_task", "read_manifest", "read_ratings"]
