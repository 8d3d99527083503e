"""Data: the FCaps on-disk format (fcaps_format), Lhotse manifests and audio decoding (manifests), the input
pipeline's config (config) and the Grain pipeline that turns prepared splits into bucketed, captioned,
tokenised batches (pipeline, with buckets, captions, hard_negatives).

Nothing is imported here, so `clsp_jax.data.config` loads without jax, grain or TFDS.
"""
