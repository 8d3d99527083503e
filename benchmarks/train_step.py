"""Train-step benchmark: compile time, steady-state step time, throughput, MFU and memory of the real step.

    python -m benchmarks.train_step --config configs/tiny.py [--batch-clips 8 --clip-seconds 5
        --text-length 112 --steps 3 --warmup 1] [--breakdown] [--remat layer] [--compilation-cache DIR]
        [--json OUT]
        [--config.key=value ...]

The config is resolved as the trainer resolves it (`trainer.resolve_config`: the objective follows
`data.stage` unless `loss.objective` names one). The network, optimizer, state, shardings and jitted step
are built as `clsp_jax.train.trainer` builds them (`build_net`, `optim.make_optimizer`,
`clsp_jax.train.state`, `make_train_step`, `sharding.JittedTrainStep`), over a synthetic batch of the given
shape (no data needed). Defaults: the config's bucket batch for `--clip-seconds`, its text length and
objective. With `train.cache_text_states`
the batch carries random text states [B, C, H] in place of the tokens, as the trainer sends its cached
[CLS] states, so the text encoder below the pooler is not in the step; the cache's one-time build is
reported as analytic FLOPs per caption only (not run). The batch always carries waveforms:
`train.cache_speech_states` (tiny's setting, which after the first epoch leaves only the heads of the audio
side in the step) is not modelled, so this measures the step of a first epoch.

MFU = FLOPs per step / step time / peak FLOP/s, where the peak is a large matmul in the compute dtype
measured in the same run (so a busy machine lowers both). FLOPs come from XLA's `cost_analysis()` of the
compiled step (per device) and from `benchmarks.flops` (matmuls/convs only); both are printed with their
ratio. `--breakdown` also times the forward and forward+backward of each part on its own: fbank,
Conv2dSubsampling (and each of its layers), the Zipformer2 encoder, the text side up to its embeddings
(text tower + heads, or only the pooler + heads on cached states), the loss.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common, flops
from clsp_jax import perf
from clsp_jax import losses, optim, sharding
from clsp_jax.data import buckets
from clsp_jax.features import fbank
from clsp_jax.models.clsp import CLSPNet
from clsp_jax.train import state as train_state
from clsp_jax.train.step import make_train_step
from clsp_jax.train.text_cache import check_cacheable
from clsp_jax.train.trainer import DTYPES, build_net, resolve_config


def parse_args(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-clips", type=int, default=0, help="clips per global batch (0: the config's bucket batch)")
    p.add_argument("--clip-seconds", type=float, default=5.0, help="padded clip length")
    p.add_argument("--text-length", type=int, default=0, help="tokens per caption (0: the config's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--remat", choices=("none", "layer", "layer_save_dots"), help="sets config.model.remat")
    p.add_argument("--breakdown", action="store_true", help="also time each component fwd and fwd+bwd")
    p.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak FLOP/s (0: 4096 CPU, 8192 GPU)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="JAX's persistent compilation cache, as the trainer uses it (train.compilation_cache_dir): "
                        "a first run compiles and writes it, a second loads from it (default: off)")
    p.add_argument("--json", help="write the results here")
    args, rest = p.parse_known_args(argv)
    config = common.load_config(rest)
    if args.remat:
        with config.unlocked():
            config.model.remat = args.remat
    return args, resolve_config(config)


def batch_shape(config, args) -> tuple[int, int, int, int]:
    """(clips, samples per clip, captions per clip, tokens per caption)."""
    d = config.data
    samples = round(args.clip_seconds * d.sample_rate)
    clips = args.batch_clips or buckets.bucket_batch_sizes([args.clip_seconds], d.max_audio_seconds_per_batch,
                                                           d.batch_size_multiple)[0]
    length = args.text_length or d.text_fixed_length or max(d.text_length_buckets)
    return clips, samples, losses.OBJECTIVES[config.loss.objective].captions, length


def synthetic_batch(clips: int, samples: int, captions: int, length: int, vocab: int, stage: int,
                    seed: int = 0, text_hidden: int = 0) -> dict[str, np.ndarray]:
    """A host batch in the step's layout: audio [B, N] (noise), audio_lens [B] = N, input_ids /
    attention_mask [B, C, L] (random tokens, all valid) or, when `text_hidden` H > 0, text_states
    [B, C, H] float32 (random normal, standing in for cached [CLS] states), negative_valid [B] in stage 3."""
    rng = np.random.default_rng(seed)
    batch = {
        "audio": (0.1 * rng.standard_normal((clips, samples))).astype(np.float32),
        "audio_lens": np.full(clips, samples, np.int32),
    }
    if text_hidden:
        batch["text_states"] = rng.standard_normal((clips, captions, text_hidden)).astype(np.float32)
    else:
        batch["input_ids"] = rng.integers(1000, vocab, (clips, captions, length), dtype=np.int32)
        batch["attention_mask"] = np.ones((clips, captions, length), np.int32)
    if stage == 3:
        batch["negative_valid"] = np.ones(clips, bool)
    return batch


# ------------------------------------------------------------------------------------------- breakdown


def time_component(name: str, module: nnx.Module, prefix: str, call: Callable, inputs: Sequence[jax.Array],
                   grad_inputs: Sequence[int], frozen: Sequence[str], seed: int, warmup: int, iters: int) -> dict:
    """Times `call(module, *inputs, rngs)` (one float array out) forward and forward+backward, as jits.

    The backward pass takes gradients w.r.t. the module's trainable parameters (those whose full path
    `prefix/...` matches no `frozen` regex: frozen ones are not differentiated, as the step's
    stop_gradient lets XLA drop their backward) and w.r.t. `inputs[i]` for i in `grad_inputs`, with a
    cotangent of ones. Row: {"name", "fwd", "fwd_bwd": timing summaries, "*_compile_s", "*_xla_flops"}.
    """
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))
    trains = [not flops.is_frozen(frozen, "/".join(filter(None, (prefix, sharding.path_str(path)))))
              for path, _ in leaves]
    trainable = [x for (_, x), t in zip(leaves, trains) if t]
    fixed = [x for (_, x), t in zip(leaves, trains) if not t]

    def forward(trainable, fixed, *inputs):
        it_t, it_f = iter(trainable), iter(fixed)
        params = jax.tree_util.tree_unflatten(treedef, [next(it_t) if t else next(it_f) for t in trains])
        rngs = nnx.Rngs(dropout=jax.random.key(seed))
        return call(nnx.merge(graphdef, params, rest), *inputs, rngs)

    def forward_backward(trainable, fixed, *inputs):
        def f(trainable, *diff):
            full = list(inputs)
            for i, x in zip(grad_inputs, diff):
                full[i] = x
            return forward(trainable, fixed, *full)

        out, vjp = jax.vjp(f, trainable, *[inputs[i] for i in grad_inputs])
        return out, vjp(jnp.ones_like(out))

    row = {"name": name, "trainable_params": int(sum(x.size for x in trainable)),
           "frozen_params": int(sum(x.size for x in fixed))}
    for label, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(trainable, fixed, *inputs).compile()
        row[f"{label}_compile_s"] = time.perf_counter() - start
        row[f"{label}_xla_flops"] = perf.xla_flops(compiled)
        row[label] = common.summary(perf.time_calls(lambda: compiled(trainable, fixed, *inputs), warmup, iters))
        print(f"  {name:30s} {label:8s} {row[label]['median_s']:8.3f} s  (compile {row[f'{label}_compile_s']:.1f} s)",
              flush=True)
    return row


def breakdown(net, config, host: dict, shape: dict, args) -> list[dict]:
    """Per-component timings on the batch `host` (the step's shapes; `shape`: its `flops.step_flops`
    keywords), one dict per row.

    Rows with "in_step" add up to (most of) the step: fbank, encoder_embed, zipformer, text, loss, each
    with the config's frozen parameters frozen. "text" is the text side as the step runs it, up to the
    unit-norm embeddings: `CLSPNet.embed_tokens` on the tokens, or `embed_cls_states` (pooler + heads) on
    cached text states. The encoder_embed.* rows time each Conv2dSubsampling layer alone as if it trained
    (frozen ignored), and "encoder_embed[trainable]" the whole front end so, when the config freezes it:
    what training it would cost. "analytic_fwd" / "analytic_fwd_bwd" are the matching
    `benchmarks.flops` FLOPs.
    """
    frozen, seed, warmup, iters = list(config.optim.frozen), int(config.train.seed), args.warmup, args.steps
    audio, audio_lens = jnp.asarray(host["audio"]), jnp.asarray(host["audio_lens"])
    b, c = shape["batch"], shape["captions"]
    model = config.model.to_dict()
    counted = {r.name: r for r in flops.step_flops(model, frozen, **shape).rows}
    trainable = {r.name: r for r in flops.step_flops(model, [], **shape).rows}

    def analytic(row, table, prefix):
        picked = [r for n, r in table.items() if n == prefix or n.startswith(prefix + ".")]
        row["analytic_fwd"] = sum(r.fwd for r in picked)
        row["analytic_fwd_bwd"] = sum(r.fwd + r.bwd for r in picked)
        return row

    rows = []

    def add(row, table, prefix, in_step):
        rows.append(analytic(dict(row, in_step=in_step), table, prefix))

    print("breakdown (median of timed calls):", flush=True)
    fbank_fn = jax.jit(fbank)
    start = time.perf_counter()
    feats, feat_lens = jax.block_until_ready(fbank_fn(audio, audio_lens))
    compile_s = time.perf_counter() - start
    times = perf.time_calls(lambda: fbank_fn(audio, audio_lens), warmup, iters)
    add({"name": "fbank", "fwd": common.summary(times), "fwd_compile_s": compile_s}, counted, "fbank", True)
    print(f"  {'fbank':30s} {'fwd':8s} {rows[-1]['fwd']['median_s']:8.3f} s", flush=True)

    speech = net.speech
    embed = speech.encoder_embed
    embed_call = lambda m, x, lens, rngs: m(x, lens, rngs=rngs)[0]
    embed_frozen = [n for n, p in flops.EMBED_PATHS.items() if flops.is_frozen(frozen, p)]
    add(time_component("encoder_embed", embed, "speech/encoder_embed", embed_call, [feats, feat_lens], [], frozen,
                       seed, warmup, iters), counted, "encoder_embed", True)
    if embed_frozen:
        add(time_component("encoder_embed[trainable]", embed, "speech/encoder_embed", embed_call,
                           [feats, feat_lens], [], [], seed, warmup, iters), trainable, "encoder_embed", False)

    # Each layer of Conv2dSubsampling on its own, on inputs of the shapes it sees in the tower.
    # Values do not matter for speed, shapes do: zeros of each layer's input shape.
    x = jnp.zeros(feats.shape + (1,), embed.dtype)
    layers = {}  # row name -> (module, input)
    for key in ("0", "4", "7"):
        layers[f"conv{key}"] = (embed.conv[key], x)
        x = jax.eval_shape(embed.conv[key], x)
        x = jnp.zeros(x.shape, x.dtype)
    cn = embed.convnext
    layers["convnext.depthwise"] = (cn.depthwise_conv, x)
    layers["convnext.pointwise1"] = (cn.pointwise_conv1, x)
    layers["convnext.pointwise2"] = (cn.pointwise_conv2,
                                     jnp.zeros(x.shape[:-1] + (cn.pointwise_conv1.out_features,), x.dtype))
    bt, tt, ft, ct = x.shape
    layers["out"] = (embed.out, jnp.zeros((bt, tt, ft * ct), x.dtype))
    for name, (module, inp) in layers.items():
        # The first conv's input is the fbank: no input gradient, as in the step.
        add(time_component(f"encoder_embed.{name}", module, "", lambda m, x, rngs: m(x), [inp],
                           [] if name == "conv0" else [0], [], seed, warmup, iters),
            trainable, f"encoder_embed.{name}", False)

    enc_x, enc_lens = embed(feats, feat_lens)
    # The Zipformer's input gradient is only needed when the front end trains.
    add(time_component("zipformer", speech.encoder, "speech/encoder", lambda m, x, lens, rngs: m(x, lens, rngs=rngs)[0],
                       [enc_x, enc_lens], [] if len(embed_frozen) == len(flops.EMBED_PATHS) else [0], frozen, seed,
                       warmup, iters), counted, "zipformer", True)

    # CLSPNet's text methods on a view holding only the parts they use, so only those are parameters here.
    heads = dict(text_projection=net.text_projection, text_transform=net.text_transform)
    if "text_states" in host:
        text = nnx.Dict(text_encoder=nnx.Dict(pooler=net.text_encoder.pooler), **heads)
        text_call = lambda m, states, rngs: CLSPNet.embed_cls_states(m, states, deterministic=False, rngs=rngs)
        text_inputs = [jnp.asarray(host["text_states"].reshape(b * c, -1))]
    else:
        text = nnx.Dict(text_encoder=net.text_encoder, **heads)
        text_call = lambda m, ids, mask, rngs: CLSPNet.embed_tokens(m, ids, mask, deterministic=False, rngs=rngs)
        text_inputs = [jnp.asarray(host[k].reshape(b * c, -1)) for k in ("input_ids", "attention_mask")]
    add(time_component("text", text, "", text_call, text_inputs, [], frozen, seed, warmup, iters), counted, "text",
        True)

    objective = losses.OBJECTIVES[config.loss.objective]
    joint = net.audio_projection["2"].out_features
    keys = jax.random.split(jax.random.key(1), 2)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    audio_emb = unit(jax.random.normal(keys[0], (b, joint)))
    text_emb = unit(jax.random.normal(keys[1], (b, c, joint)))
    extra = {"negative_valid": jnp.ones(b, bool)} if config.data.stage == 3 else {}
    loss_cfg = config.loss.to_dict()
    # The only parameters the loss sees: the temperature, and the bias of objectives that have one.
    loss_params = {"logit_scale": net.logit_scale}
    if objective.logit_bias:
        loss_params["logit_bias"] = net.logit_bias
    loss_module = nnx.Dict(loss_params)
    loss_call = lambda m, a, t, rngs: objective.loss(
        a, t, jnp.exp(m["logit_scale"][...]), m["logit_bias"][...] if objective.logit_bias else None, extra,
        loss_cfg, None)[0]
    add(time_component("loss", loss_module, "", loss_call, [audio_emb, text_emb], [0, 1], [], seed, warmup, iters),
        counted, "loss", True)
    return rows


# ----------------------------------------------------------------------------------------------- main


def build_step(config, net, mesh) -> tuple[Callable, dict]:
    """(jitted step, train state) of `net` as the trainer builds them; the step donates the state."""
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    tx, schedule = optim.make_optimizer(config.optim.to_dict(), params)
    state = train_state.init_state(net, tx, ema=config.optim.get("ema_decay") is not None,
                                   average=bool(config.optim.get("average_period")))
    shardings = train_state.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step_fn = make_train_step(graphdef, rest, tx, schedule, objective=config.loss.objective,
                              loss_cfg=config.loss.to_dict(), seed=int(config.train.seed),
                              ema_decay=config.optim.get("ema_decay"), frozen=list(config.optim.frozen), mesh=mesh,
                              average_period=config.optim.get("average_period"))
    return sharding.JittedTrainStep(step_fn, shardings, mesh), state


def run(args, config) -> dict:
    t = config.train
    info = common.machine()
    clips, samples, captions, length = batch_shape(config, args)
    cached, hidden = bool(t.cache_text_states), int(config.model.text.hidden_size)
    shape = dict(batch=clips, samples=samples, captions=captions, text_length=length, text_states=cached)
    dtype = DTYPES[t.compute_dtype]
    audio_seconds = clips * samples / config.data.sample_rate
    text = f"cached text states [{hidden}]" if cached else f"{length} tokens"
    print(f"machine: {info}")
    print(f"batch: {clips} clips x {samples / config.data.sample_rate:.2f} s ({audio_seconds:.0f} s audio), "
          f"{captions} captions x {text}; objective {config.loss.objective}; dtype {t.compute_dtype}; "
          f"remat {config.model.get('remat', 'none')}", flush=True)

    if args.compilation_cache:
        perf.use_compilation_cache(args.compilation_cache)
    peak = perf.peak_matmul_flops(dtype, args.peak_size or perf.default_peak_size())
    print(f"peak: {peak['size']}^2 {peak['dtype']} matmul {peak['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

    start = time.perf_counter()
    net = build_net(config, t.seed)
    build_s = time.perf_counter() - start
    if cached:  # as the trainer's check_config: only a text encoder frozen below its pooler is cached
        params = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(net, nnx.Param)))[0]
        check_cacheable([sharding.path_str(p) for p, _ in params], list(config.optim.frozen), int(config.data.stage))
    mesh = sharding.make_mesh(sharding.parse_mesh_shape(t.mesh, jax.device_count()))
    host = synthetic_batch(clips, samples, captions, length, int(config.model.text.vocab_size),
                           int(config.data.stage), seed=int(t.seed), text_hidden=hidden if cached else 0)
    rows = breakdown(net, config, host, shape, args) if args.breakdown else None

    step, state = build_step(config, net, mesh)
    del net  # its arrays now belong to the state, which the step donates
    batch = sharding.global_batch(host, mesh)

    perf.release_compiled_programs()  # as the trainer does before the step compiles
    start = time.perf_counter()
    programs = step.compile(state, batch)  # (gradients, update), as the trainer's first step compiles them
    compile_s = time.perf_counter() - start
    perf.release_host_memory()  # as the trainer does after compiling
    how = "compile or load from the cache" if args.compilation_cache else "compile"
    print(f"compile: {compile_s:.1f} s (trace, lower and {how} of both programs)", flush=True)

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return holder["state"], metrics

    times = perf.time_calls(one_step, args.warmup, args.steps)
    step_stats = common.summary(times)
    step_s = step_stats["median_s"]
    loss = float(jax.device_get(one_step()[1]["loss"]))  # one more step: its loss shows the step is real

    count = flops.step_flops(config.model.to_dict(), list(config.optim.frozen), **shape)
    devices = jax.device_count()
    xla = sum(perf.xla_flops(p) for p in programs)  # per device
    analytic_dev = count.total_executed / devices
    result = {
        "benchmark": "train_step",
        "machine": info,
        "config": {"objective": config.loss.objective, "compute_dtype": t.compute_dtype,
                   "remat": config.model.get("remat", "none"), "mesh": list(mesh.shape.values()), "frozen": list(config.optim.frozen),
                   "cache_text_states": cached},
        "batch": {"clips": clips, "clip_seconds": samples / config.data.sample_rate, "captions": captions,
                  "text_length": length, "text_states_cached": cached, "audio_seconds": audio_seconds},
        "build_net_s": build_s,
        "compile_s": compile_s,
        "compilation_cache": bool(args.compilation_cache),
        "step": step_stats,
        "loss_after": loss,
        "samples_per_s": clips / step_s,
        "audio_seconds_per_s": audio_seconds / step_s,
        "peak": peak,
        "flops": {
            "xla_per_device": xla,
            "analytic_model": count.total_model,
            "analytic_executed": count.total_executed,
            "xla_over_analytic": xla / analytic_dev if analytic_dev else float("nan"),
            "analytic_rows": [vars(r) for r in count.rows],
            "analytic_text_cache_per_caption": count.text_cache_per_caption,  # once, before training
        },
        "mfu_xla": xla / step_s / peak["flops_per_s"],
        "mfu_analytic": count.total_model / devices / step_s / peak["flops_per_s"],
        "memory_per_device": perf.memory_stats(*programs),  # each field the larger program's
        "memory_seen": common.memory_seen(),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    if rows is not None:
        result["breakdown"] = rows
    return result


def report(r: dict) -> None:
    f, peak = r["flops"], r["peak"]["flops_per_s"]
    print(f"\nstep: median {r['step']['median_s']:.3f} s (min {r['step']['min_s']:.3f}, max {r['step']['max_s']:.3f}) "
          f"over {len(r['step']['times_s'])} steps; {r['samples_per_s']:.2f} clips/s, "
          f"{r['audio_seconds_per_s']:.1f} audio-s/s; loss {r['loss_after']:.4f}")
    print(f"FLOPs/step: XLA {f['xla_per_device'] / 1e9:.1f} G per device, analytic {f['analytic_model'] / 1e9:.1f} G "
          f"(executed {f['analytic_executed'] / 1e9:.1f} G); XLA / analytic = {f['xla_over_analytic']:.3f}; "
          f"text states {'cached' if r['batch']['text_states_cached'] else 'not cached (text encoder in the step)'}")
    if r["batch"]["text_states_cached"]:
        print(f"text-state cache (built once before training, not run here): "
              f"{f['analytic_text_cache_per_caption'] / 1e9:.3f} GFLOP forward per distinct caption at "
              f"<= {r['batch']['text_length']} tokens (analytic)")
    print(f"MFU: {100 * r['mfu_xla']:.1f}% (XLA FLOPs), {100 * r['mfu_analytic']:.1f}% (analytic) "
          f"of the measured peak {peak / 1e9:.1f} GFLOP/s")
    mem = r["memory_per_device"]
    if mem:
        print("memory per device: " + ", ".join(f"{k.replace('_size_in_bytes', '')} {common.gib(v)}"
                                                for k, v in mem.items()))
    print("memory seen: " + ", ".join(f"{k} {common.gib(v)}" for k, v in r["memory_seen"].items()))
    if "breakdown" in r:
        step_s = r["step"]["median_s"]
        print(f"\n{'component (median / min s)':30s} {'fwd':>13s} {'fwd+bwd':>13s} {'bwd/fwd':>8s} {'fwd GF/s':>9s} "
              f"{'f+b GF/s':>9s} {'% step':>7s}")
        for row in r["breakdown"]:
            fwd = row["fwd"]
            fb = row.get("fwd_bwd", fwd)
            share = f"{100 * fb['median_s'] / step_s:6.1f}%" if row["in_step"] else ""
            print(f"{row['name']:30s} {fwd['median_s']:6.3f}/{fwd['min_s']:6.3f} {fb['median_s']:6.3f}/{fb['min_s']:6.3f} "
                  f"{fb['min_s'] / fwd['min_s'] - 1:8.1f} {row['analytic_fwd'] / fwd['min_s'] / 1e9:9.1f} "
                  f"{row['analytic_fwd_bwd'] / fb['min_s'] / 1e9:9.1f} {share:>7s}")
        parts = sum(row.get("fwd_bwd", row["fwd"])["median_s"] for row in r["breakdown"] if row["in_step"])
        print(f"{'rest of the step':30s} {'':13s} {step_s - parts:13.3f} {'':8s} {'':9s} {'':9s} "
              f"{100 * (step_s - parts) / step_s:6.1f}%  (audio heads, optimizer, glue; negative = overlap/noise)")
        print("(GF/s and bwd/fwd from the min times; % step from the medians)")


def main(argv: Sequence[str] | None = None) -> None:
    args, config = parse_args(argv)
    result = run(args, config)
    common.write_json(args.json, result)
    report(result)


if __name__ == "__main__":
    main()
