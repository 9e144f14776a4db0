"""The trainers' step under ``KERAS_BACKEND=jax``: one pure function, jitted once per batch shape.

``_TrainerBase._build_step`` takes this builder on JAX (``tf.function`` + ``GradientTape`` on TensorFlow).
The step's state is passed in and handed back as arrays: the trained variables' values, every other
variable the loss reads (the frozen model weights, as arguments rather than constants baked into the
program), the optimizers' variables and the EMA. The loss (``trainer._loss``, keras.ops) runs inside a
``keras.StatelessScope`` that maps each variable to its traced value, so the models compute with them as
``stateless_call`` would; ``jax.value_and_grad`` differentiates it, each AdamW's ``stateless_apply`` updates
its group, and the EMA follows. The random draws are made on the host before the call (``trainer._draw``
with TensorFlow's stateless ops and the seed the TensorFlow step would use), so both backends train on
the same noise, timesteps and caption dropout.

Under a ``keras.distribution`` (e.g. ``DataParallel``) the batch and the draws are laid out as the
distribution says (split along the batch) and XLA reduces the gradients across devices.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def _frozen_variables(trainer) -> list:
    """Every variable of the trainer's models (and the pipeline's other encoders) that does not train."""
    trained = {id(v) for v in trainer.trainable_variables}
    models = list(trainer.components.values())
    pipeline = getattr(trainer, "pipeline", None)
    for name in ("text_encoder_2", "controlnet"):
        models.append(getattr(pipeline, name, None) if pipeline is not None else None)
    seen, out = set(trained), []
    for model in models:
        if model is None:
            continue
        for v in model.variables:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def _host_seed(config_seed: int, step: int):
    """The (2,) seed the TensorFlow step draws with on replica 0 (``_TrainerBase._seed``)."""
    base = tf.constant([config_seed, step], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, 0)


def _to_device(tree):
    """numpy / TensorFlow values -> JAX arrays, split along the batch under a ``keras.distribution``."""
    import jax

    distribution = keras.distribution.distribution()

    def put(x):
        x = np.asarray(x)
        if distribution is None or x.ndim == 0:
            return jax.numpy.asarray(x)
        layout = distribution.get_data_layout(x.shape)
        return jax.device_put(x, layout.backend_layout)

    return jax.tree_util.tree_map(put, tree)


def stateless_loss(trainer, loss_fn):
    """``f(trained_values, frozen_values, *args) -> (loss, aux)``: ``loss_fn(*args)`` with the variables
    mapped to the given values (pure, for ``jax.value_and_grad`` and ``jax.jit``), and the frozen list."""
    trainable = trainer.trainable_variables
    frozen = _frozen_variables(trainer)

    def f(trained_values, frozen_values, *args):
        mapping = list(zip(trainable, trained_values, strict=True))
        mapping += list(zip(frozen, frozen_values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return loss_fn(*args)

    return f, frozen


def value_and_grad(trainer, loss_fn):
    """A jitted ``(*args) -> (loss, [gradient per trained variable])`` of a scalar ``loss_fn(*args)`` at the
    trained variables' current values (for checking gradients against a reference)."""
    import jax

    f, frozen = stateless_loss(trainer, lambda *a: (loss_fn(*a), None))
    grad = jax.jit(jax.value_and_grad(f, has_aux=True))

    def run(*args):
        values = [v.value for v in trainer.trainable_variables]
        (loss, _), grads = grad(values, [v.value for v in frozen], *_to_device(args))
        return loss, grads

    return run


def build_step(trainer):
    """``batch -> logs``: one optimizer step of ``trainer`` that writes the new state into its variables."""
    import jax

    config = trainer.config
    trainable = trainer.trainable_variables
    loss, frozen = stateless_loss(trainer, trainer._loss)
    groups = trainer._optimizers
    sizes = [len(optimizer.variables) for optimizer, _ in groups]
    first_iterations = next(i for i, v in enumerate(groups[0][0].variables) if v is groups[0][0].iterations)
    traces = [0]

    def step(trained, frozen_values, optimizer_values, ema, batch, draws):
        traces[0] += 1  # runs only while tracing: counts compilations
        (value, logs), grads = jax.value_and_grad(loss, has_aux=True)(trained, frozen_values, batch, draws)
        logs = dict(logs)
        if config.grad_clip_norm is not None:
            norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
            scale = ops.minimum(1.0, config.grad_clip_norm / ops.maximum(norm, 1e-30))
            grads = [g * scale for g in grads]
            logs["grad_norm"] = norm
        new_trained, new_optimizer, offset = list(trained), [], 0
        for (optimizer, indices), size in zip(groups, sizes, strict=True):
            values, state = optimizer.stateless_apply(
                optimizer_values[offset : offset + size],
                [grads[i] for i in indices],
                [trained[i] for i in indices],
            )
            for i, v in zip(indices, values, strict=True):
                new_trained[i] = v
            new_optimizer += list(state)
            offset += size
        new_ema = list(ema)
        if ema:
            n = ops.cast(new_optimizer[first_iterations], "float32")  # updates done, >= 1 here
            decay = ops.convert_to_tensor(config.ema_decay, "float32")
            if config.ema_warmup:
                decay = ops.minimum(decay, (1.0 + n) / (10.0 + n))
            new_ema = [
                e * decay + ops.cast(v, e.dtype) * (1.0 - decay)
                for e, v in zip(ema, new_trained, strict=True)
            ]
        return dict(logs, loss=value), new_trained, new_optimizer, new_ema

    compiled = jax.jit(step)
    optimizer_variables = trainer._optimizer_variables()

    def run(batch):
        seed = _host_seed(config.seed, trainer.step)
        batch = tuple(np.asarray(b) for b in batch)
        draws = {k: np.asarray(v) for k, v in trainer._draw(batch, seed).items()}
        logs, new_trained, new_optimizer, new_ema = compiled(
            [v.value for v in trainable],
            [v.value for v in frozen],
            [v.value for v in optimizer_variables],
            [v.value for v in trainer.ema_variables],
            _to_device(batch),
            _to_device(draws),
        )
        for group in (
            (trainable, new_trained),
            (optimizer_variables, new_optimizer),
            (trainer.ema_variables, new_ema),
        ):
            for variable, value in zip(*group, strict=True):
                variable.assign(value)
        return logs

    run.traces = traces
    return run


def build_loss(trainer):
    """``(batch, seed) -> loss`` without updating anything (``compute_loss``), jitted per batch shape."""
    import jax

    loss, frozen = stateless_loss(trainer, trainer._loss)
    compiled = jax.jit(lambda *args: loss(*args)[0])

    def run(batch, seed):
        batch = tuple(np.asarray(b) for b in batch)
        draws = {k: np.asarray(v) for k, v in trainer._draw(batch, seed).items()}
        return compiled(
            [v.value for v in trainer.trainable_variables],
            [v.value for v in frozen],
            _to_device(batch),
            _to_device(draws),
        )

    return run
