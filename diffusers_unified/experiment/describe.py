"""`--mode=describe`: what a config builds, as one JSON line, without training or sampling.

The network's parameter count (from `jax.eval_shape`: no weights are
allocated, so a 100 M-parameter network is described on any machine), its
FLOPs per forward at the config's training batch (XLA's cost analysis of
the lowered forward, before compilation), the data shape, the process with
its resolved settings and what the network is conditioned on, and the
sampler. Researchers compare a config with a paper's parameter count with it.

Image data are not loaded: their shape is the config's (data.image_size,
data.num_channels). The data set is loaded only when the config needs it
(AUTO noise scales, a class-conditional network's label count, or vector
data, whose shape only the data know).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

from diffusers_unified.experiment import config as config_lib
from diffusers_unified.experiment import kinds
from diffusers_unified.experiment import run as run_lib
from diffusers_unified.nets import NetApply, count_params


def describe(config) -> dict:
    dataset_kind = kinds.DATASETS[config.data.dataset]
    needs_data = (
        not dataset_kind.images or config_lib.auto_keys(config) or config.model.class_conditional
    )
    if needs_data:
        ds = dataset_kind.build(config.data, config.seed)
        shape, centered = ds.data_shape, ds.scaling.centered
        resolved, classes = run_lib.resolve_auto(config, ds), run_lib.num_classes(config, ds)
    else:
        d = config.data
        shape, centered = (d.image_size, d.image_size, d.num_channels), d.centered
        resolved, classes = config, None
    module = run_lib.build_network(config, classes, centered)
    process = run_lib.build_process(resolved, module)
    net = NetApply(module)
    batch = config.training.batch_size
    y = jax.ShapeDtypeStruct((batch,), jnp.int32) if classes is not None else None
    one_label = None if y is None else jnp.zeros((1,), jnp.int32)
    params = jax.eval_shape(
        lambda key: net.init(key, (1, *shape), one_label), jax.random.PRNGKey(0)
    )
    x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    noise_cond = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cost = jax.jit(lambda p, x, c, y: net(p, x, c, y)).lower(params, x, noise_cond, y)
    flops = cost.cost_analysis().get("flops")
    p = resolved.process
    return {
        "model": config.model.name,
        "parameters": count_params(params),
        "flops_per_forward": None if flops is None else float(flops),
        "flops_batch": batch,
        "dtype": config.model.dtype,
        "data_shape": list(shape),
        "dataset": config.data.dataset,
        "process": {
            "name": p.name,
            **{k: p[k] for k in kinds.PROCESSES[p.name].settings},
            "conditioning": process.conditioning,
        },
        "parametrization": config.model.parametrization,
        "sampler": kinds.describe_sampler(resolved.sampling),
        "num_steps": resolved.sampling.num_steps or process.N,
    }


def main(config) -> dict:
    out = describe(config)
    print(json.dumps(out, sort_keys=True), flush=True)
    return out
