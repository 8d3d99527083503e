"""The train state: a plain pytree, its shardings (defined here only), and its creation in those shardings.

    {"step": int32 [], "params": nested dict of float32 master weights, "opt_state": optax state,
     "ema": float32 params or None, "nonfinite_streak": int32 []}

plus, with model averaging on (`optim.average_period`), "average": icefall's running average of the weights,
{"count": int32 [], "mean": float32 params, "comp": float32 params} (`clsp_jax.averaging`); without it the key
is absent, so states and checkpoints of runs without averaging are unchanged.

Orbax saves it as is and `nnx.merge(graphdef, state["params"], rest)` rebuilds the network. Every array is
sharded by `state_shardings`: parameters, optimizer moments, EMA and running average by the logical rules of
`clsp_jax.sharding` (a moment follows its parameter), scalars replicated. `init_sharded_state` creates it
directly in those shardings, on one process or many, and `abstract_state` describes it for a restore that
never materialises an initial state at all.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from clsp_jax import averaging, optim, sharding


def state_from_params(params, tx: optax.GradientTransformation, ema: bool = False, average: bool = False) -> dict:
    """The train state at step 0 around `params` (a nested dict of arrays): fresh optimizer state, EMA and
    running average (`average`: the key is added only then)."""
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": optim.ema_init(params) if ema else None,
        "nonfinite_streak": jnp.zeros((), jnp.int32),
    }
    if average:
        state["average"] = averaging.average_init(params)
    return state


def params_of(net: nnx.Module) -> dict:
    """The network's parameters as a plain nested dict (what Orbax saves and `nnx.merge` takes)."""
    return nnx.to_pure_dict(nnx.state(net, nnx.Param))


def init_state(net: nnx.Module, tx: optax.GradientTransformation, ema: bool = False, average: bool = False) -> dict:
    """The unsharded train state of `net` (single-device tests and references)."""
    return state_from_params(params_of(net), tx, ema, average)


def state_shardings(state, mesh: Mesh):
    """NamedShardings of a train state (arrays or ShapeDtypeStructs): the one definition the trainer, the
    restore and the step use."""
    return sharding.param_shardings(state, mesh)


def abstract_state(abstract_params, tx: optax.GradientTransformation, mesh: Mesh, ema: bool = False,
                   average: bool = False):
    """ShapeDtypeStructs with shardings of the train state around `abstract_params` (a nested dict of the
    parameters' ShapeDtypeStructs, e.g. from `nnx.eval_shape` of the network): a restore target; nothing is
    computed or allocated."""
    shapes = jax.eval_shape(lambda p: state_from_params(p, tx, ema, average), abstract_params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(shapes, mesh))


def init_sharded_state(make_net: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                       ema: bool = False, *, jit_init: bool = False, params=None,
                       average: bool = False) -> tuple[dict, dict]:
    """The train state of `make_net()` created in its shardings; returns (state, shardings).

    The optimizer state, EMA and running average come out of a jit whose outputs land in their shardings: no
    replicated copy of them ever exists. The parameters come from:
      params (a nested dict of host arrays, identical on every process, e.g. a network built and filled
        on the host CPU): each process copies only its own devices' shards (`sharding.place`); `make_net`
        is not called;
      jit_init=False (default): `make_net()` run eagerly, then placed the same way;
      jit_init=True: `make_net()` traced under `jax.jit(out_shardings=...)`, so each device only ever holds
        its shards (for models too big for one device); random init only, and each random draw compiles
        on its own, so it compiles much more slowly than the eager init.
    """
    make_state = lambda: state_from_params(params_of(make_net()), tx, ema, average)
    if jit_init:
        shardings = state_shardings(jax.eval_shape(make_state), mesh)
        return jax.jit(make_state, out_shardings=shardings)(), shardings
    if params is None:
        params = params_of(make_net())
    shardings = state_shardings(jax.eval_shape(lambda p: state_from_params(p, tx, ema, average), params), mesh)
    params = sharding.place(params, shardings["params"])
    state = jax.jit(lambda p: state_from_params(p, tx, ema, average), out_shardings=shardings, donate_argnums=0)(params)
    return state, shardings
