"""Periodic evaluation inside training (filled in by the evaluators of clsp_jax.evals)."""


def make_evaluator(config):
    """-> `(net, step) -> metrics` or None when the config asks for no evaluation."""
    return None
