"""Every layer of ours is built when it is constructed.

A Keras layer whose ``built`` is False when first called is built by Keras tracing its ``call`` once more
on symbolic inputs (``Layer._maybe_build`` -> ``compute_output_spec``), and a container whose sublayers are
unbuilt does that at every level. That doubled the Python tracing of the default model's first image.
Our layers create their weights in ``__init__`` (layer paths equal checkpoint keys), so each says it is
complete there.
"""

import importlib
import inspect
import pkgutil

import keras

import tf_diffusion


def _layer_classes():
    for info in pkgutil.walk_packages(tf_diffusion.__path__, "tf_diffusion."):
        if info.name.endswith("__main__") or info.name.startswith(("tf_diffusion.serve", "tf_diffusion.cli")):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, keras.layers.Layer):
                yield cls


def _marks_built(cls) -> bool:
    """True when ``cls`` or a class it inherits from (ours) has a build() or sets built in __init__."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("tf_diffusion"):
            return False
        if "build" in vars(klass):
            return True
        init = vars(klass).get("__init__")
        if init is not None and "self.built = True" in inspect.getsource(init):
            return True
    return False


def test_every_layer_class_says_it_is_built():
    classes = sorted({c for c in _layer_classes()}, key=lambda c: (c.__module__, c.__name__))
    assert len(classes) > 50, [c.__name__ for c in classes]  # the walk found the model files
    unmarked = [f"{c.__module__}.{c.__name__}" for c in classes if not _marks_built(c)]
    assert not unmarked, f"layers that Keras would build by tracing their call again: {unmarked}"


def test_the_default_model_has_no_unbuilt_layer():
    from tf_diffusion.models import DEFAULT_MODEL, check_source
    from tf_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion.from_pretrained(check_source(DEFAULT_MODEL))  # built under weights_to_be_loaded
    for name in ("text_encoder", "unet", "vae"):
        model = getattr(sd, name)
        unbuilt = sorted({type(layer).__name__ for layer in model._flatten_layers() if not layer.built})
        assert not unbuilt, f"{name}: {unbuilt}"


def test_layers_start_as_zeros_only_when_weights_are_loaded_next():
    import numpy as np

    from tf_diffusion.layers import Conv2d, Linear, weights_to_be_loaded

    with weights_to_be_loaded():
        loaded = Linear(8, 4), Conv2d(3, 4, 3)
    fresh = Linear(8, 4), Conv2d(3, 4, 3)
    for layer in loaded:
        assert not np.any(np.asarray(layer.weight)) and not np.any(np.asarray(layer.bias))
    for layer in fresh:  # torch's default start: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        w = np.asarray(layer.weight)
        bound = 1 / np.sqrt(np.prod(w.shape[:-1]))
        assert np.all(np.abs(w) <= bound) and np.std(w) > bound / 4


def test_loaded_variables_are_created_from_the_checkpoint():
    """from_pretrained builds every variable unallocated and creates each from its tensor (no zeros buffer
    assigned over: that kept ~15% of the weights' size resident); a partial load_state_dict gives the
    unassigned ones their start values."""
    import keras
    import numpy as np

    from tf_diffusion.layers import Linear, weights_to_be_loaded
    from tf_diffusion.models import DEFAULT_MODEL, check_source
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights.safetensors_io import load_safetensors
    from tf_diffusion.weights.state_dict import (
        allocate_unassigned,
        load_state_dict,
        state_dict,
        unallocated_variables,
    )

    folder = check_source(DEFAULT_MODEL)
    sd = StableDiffusion.from_pretrained(folder)
    for name in ("text_encoder", "unet", "vae"):
        model = getattr(sd, name)
        assert all(v._value is not None for v in model.variables), name
    file = load_safetensors(f"{folder}/text_encoder.safetensors")
    got = state_dict(sd.text_encoder)
    for key in list(file)[:8]:
        np.testing.assert_array_equal(got[key], np.asarray(file[key]).astype(got[key].dtype))

    class Pair(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.a, self.b = Linear(4, 3), Linear(3, 2)
            self.built = True

    with weights_to_be_loaded(), unallocated_variables() as created:
        pair = Pair()
    assert len(created) == 4 and all(v._value is None for v in created)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    load_state_dict(pair, {"a.weight": w}, strict=False)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(pair.a.weight), w.T)
    for v in (pair.a.bias, pair.b.weight, pair.b.bias):  # not in the checkpoint: the start values
        assert v._value is not None and not np.any(keras.ops.convert_to_numpy(v))
    allocate_unassigned(created)  # nothing left to do; harmless
