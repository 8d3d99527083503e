"""How often the jitted train step compiles over real Grain batches: its gradients program at most once per
bucket shape, its update program (whose shapes are the state's) once, nothing after the first pass.

    python -m benchmarks.compile_count --config configs/tiny.py [--data-dir DIR] [--epochs 2] [--json OUT]
        [--config.key=value ...]

Runs `--epochs` epochs (data.num_epochs) of the train pipeline through the step built as the trainer
builds it (`benchmarks.train_step.build_step`, host batches converted by the trainer's own
`device_batch`). Compilations are XLA backend compiles reported by `jax.monitoring` while the step is
called (and the two jits' cache sizes at the end). Without `--data-dir` a `--corpus-clips` espeak-ng corpus is
synthesised in a temporary dir. On a CPU keep batches small (e.g. data.max_audio_seconds_per_batch=15);
the count depends on the shapes, not on the model's depth, so shrinking the towers is fair too.
Exits with status 1 if anything compiled beyond that or after the first epoch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence

import jax

from benchmarks import common, train_step
from clsp_jax import losses, sharding
from clsp_jax.data import buckets
from clsp_jax.data.pipeline import make_train_iterator
from clsp_jax.tokenizer import CaptionTokenizer
from clsp_jax.train.trainer import build_net, device_batch, resolve_config


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's event name


class CompileCounter:
    """Counts XLA backend compiles while `active` (jax.monitoring duration events)."""

    def __init__(self):
        self.active, self.events = False, []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event == BACKEND_COMPILE_EVENT:
            self.events.append(duration)


def run(args, config) -> dict:
    d, t = config.data, config.train
    captions = losses.OBJECTIVES[config.loss.objective].captions
    counter = CompileCounter()
    with tempfile.TemporaryDirectory(prefix="clsp_compile_count_") as tmp:
        data_dir = args.data_dir or common.synthetic_data(tmp, args.corpus_clips)
        with config.unlocked():
            d.num_epochs = args.epochs
        tokenizer = CaptionTokenizer(d.tokenizer, buckets=tuple(d.text_length_buckets))
        data = make_train_iterator(d, data_dir=data_dir, tokenizer=tokenizer, process_index=0, process_count=1)
        mesh = sharding.make_mesh(sharding.parse_mesh_shape(t.mesh, jax.device_count()))
        step, state = train_step.build_step(config, build_net(config, t.seed), mesh)
        info = common.machine()
        print(f"machine: {info}")
        steps, shapes = [], {}
        start = time.perf_counter()
        for host in data:
            batch = device_batch(host, mesh, captions)
            shape = (tuple(batch["audio"].shape), tuple(batch["input_ids"].shape))
            before = len(counter.events)
            counter.active = True
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            counter.active = False
            compiles = counter.events[before:]
            steps.append({"step": len(steps), "shape": shape, "compiles": len(compiles),
                          "compile_s": sum(compiles)})
            shapes.setdefault(str(shape), []).append(len(steps) - 1)
            if compiles:
                print(f"step {len(steps) - 1}: audio {shape[0]} text {shape[1]} -> {len(compiles)} compile(s), "
                      f"{sum(compiles):.1f} s", flush=True)
        elapsed = time.perf_counter() - start

    batches_per_epoch = len(steps) // args.epochs  # every epoch has the same batches (buckets.py)

    first = steps[:batches_per_epoch]
    later = steps[batches_per_epoch:]
    per_shape = {s: sum(steps[i]["compiles"] for i in idx) for s, idx in shapes.items()}
    result = {
        "benchmark": "compile_count", "machine": info, "epochs": args.epochs, "steps": len(steps),
        "batches_per_epoch": batches_per_epoch, "seconds": elapsed,
        "bucket_batch_sizes": buckets.bucket_batch_sizes(d.bucket_boundaries_s, d.max_audio_seconds_per_batch,
                                                         d.batch_size_multiple),
        "distinct_shapes": len(shapes), "compiles_total": sum(s["compiles"] for s in steps),
        "compiles_first_epoch": sum(s["compiles"] for s in first),
        "compiles_after_first_epoch": sum(s["compiles"] for s in later),
        "compiles_per_shape": per_shape, "per_step": steps,
        "jit_cache_size": {"gradients": step.gradients._cache_size(), "update": step.update._cache_size()},
    }
    ok = (result["compiles_total"] <= len(shapes) + 1 and result["compiles_after_first_epoch"] == 0
          and result["jit_cache_size"] == {"gradients": len(shapes), "update": 1})
    result["ok"] = ok
    print(f"\n{len(steps)} steps ({args.epochs} epochs of {batches_per_epoch}) in {elapsed:.0f} s: "
          f"{len(shapes)} distinct batch shapes, {result['compiles_total']} compiles "
          f"({result['compiles_first_epoch']} in epoch 1, {result['compiles_after_first_epoch']} after); "
          f"jit cache size {result['jit_cache_size']}; per shape {per_shape} -> {'OK' if ok else 'RECOMPILES'}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="prepared TFDS data dir (default: synthesise one)")
    p.add_argument("--corpus-clips", type=int, default=60, help="clips of the synthesised corpus")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json")
    args, rest = p.parse_known_args(argv)
    config = resolve_config(common.load_config(rest))
    result = run(args, config)
    common.write_json(args.json, result)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
