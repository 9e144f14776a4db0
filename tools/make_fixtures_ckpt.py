"""Write the checkpoint-format fixtures under tests/fixtures/ckpt/ with the reference libraries.

Every file here is written by torch.save or safetensors.torch.save_file (the
reference writers); the expected values are what torch held before saving,
stored as float32 (floats) or their own dtype (ints, bools) in ``.npz`` files
keyed by the path inside the checkpoint, so the tests need neither torch nor
safetensors. Run with the project venv: ``python tools/make_fixtures_ckpt.py``.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import pickle
import sys
import types

import numpy as np
import safetensors.torch
import torch

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ckpt"
PWNED = "/tmp/pwned_tf_diffusion"


def expected_npz(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save what torch holds: floats as float32 (exact for fp16/bf16), others in their dtype."""
    values, dtypes = {}, {}
    for key, t in tensors.items():
        dtypes[key] = str(t.dtype).removeprefix("torch.")
        if t.is_floating_point():
            values[key] = t.detach().to(torch.float32).numpy().copy()
        else:
            values[key] = t.detach().numpy().copy()
    values["__dtypes__"] = np.array(json.dumps(dtypes))
    np.savez(path, **values)


def flatten(tree, prefix=""):
    """Tensors of a nested dict, keyed 'outer/inner' as the tests walk them."""
    found = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, dict):
            found.update(flatten(value, name + "/"))
    return found


def fake_lightning_module():
    """A stand-in ModelCheckpoint class pickled under Lightning's real global name (Lightning is not installed)."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    for name in names:
        sys.modules.setdefault(name, types.ModuleType(name))

    class ModelCheckpoint:
        def __init__(self):
            self.monitor = None
            self.best_model_path = "logs/last.ckpt"

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    return ModelCheckpoint


class Evil:
    """Pickles as a call to os.system: loading it must run nothing."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    # An SD-like Lightning checkpoint: {"state_dict": ..., "global_step": N}, fp32 tensors,
    # an nn.Parameter, int/bool buffers and a 0-dim scalar.
    sd = collections.OrderedDict()
    sd["model.conv.weight"] = randn(4, 3, 3, 3)
    sd["model.conv.bias"] = torch.nn.Parameter(randn(4))
    sd["model.proj.weight"] = randn(5, 4)
    sd["model.ids"] = torch.arange(7, dtype=torch.int64) * 1000003
    sd["model.mask"] = torch.tensor([True, False, True])
    sd["model_ema.num_updates"] = torch.tensor(321, dtype=torch.int32)
    sd["model.scale"] = torch.tensor(0.18215)
    tree = {"state_dict": sd, "global_step": 123, "epoch": 2, "misc": [1.5, "text", (None, True)]}
    torch.save(tree, OUT / "lightning.ckpt")
    expected_npz(OUT / "lightning.expected.npz", flatten(tree))

    # Half precision and every plain dtype.
    dtypes = {
        "f16": randn(3, 5, dtype=torch.float16),
        "bf16": randn(2, 3, 4, dtype=torch.bfloat16),
        "f64": randn(3, dtype=torch.float64),
        "i32": torch.tensor([-5, 0, 2**31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-300, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([0, 65535], dtype=torch.uint16),  # saved with _rebuild_tensor_v3
        "empty": torch.zeros(0, 3),
    }
    torch.save(dtypes, OUT / "dtypes.pt")
    expected_npz(OUT / "dtypes.expected.npz", dtypes)

    # Views: a transposed (non-contiguous) tensor, slices sharing one storage with
    # offsets and strides, and an expanded tensor with a zero stride.
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8
    half_base = randn(6, 4, dtype=torch.float16)
    views = {
        "base": base,
        "transposed": base.t(),
        "block": base[1:3, 2:5],
        "column": base[:, 4],
        "tail": base.view(-1)[20:],
        "expanded": torch.tensor([1.0, 2.0, 3.0]).expand(2, 3),
        "half_t": half_base.t(),
        "half_row": half_base[2],
    }
    assert not views["transposed"].is_contiguous()
    assert views["block"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    torch.save(views, OUT / "views.ckpt")
    torch.save(views, OUT / "views_legacy.ckpt", _use_new_zipfile_serialization=False)
    expected_npz(OUT / "views.expected.npz", views)

    # A legacy-format Lightning-style file with fp16/bf16 too.
    legacy = {"state_dict": {"w": randn(2, 3), "h": randn(4, dtype=torch.float16)}, "global_step": 7}
    legacy["state_dict"]["b"] = randn(3, dtype=torch.bfloat16)
    torch.save(legacy, OUT / "legacy.ckpt", _use_new_zipfile_serialization=False)
    expected_npz(OUT / "legacy.expected.npz", flatten(legacy))

    # Harmless metadata as found in SD 1.x checkpoints: a Lightning callback keyed by
    # its class, numpy scalars (numpy.dtype, _codecs.encode under protocol 2), a set.
    model_checkpoint = fake_lightning_module()
    meta = {
        "state_dict": {"w": randn(2)},
        "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.25), "monitor": None}},
        "lr": np.float32(1e-4),
        "step": np.int64(42),
        "tags": {"a", "b"},
        "pytorch-lightning_version": "1.4.2",
    }
    torch.save(meta, OUT / "metadata.ckpt")
    expected_npz(OUT / "metadata.expected.npz", flatten(meta))

    # A malicious checkpoint in the torch zip layout: os.system inside data.pkl.
    torch.save({"state_dict": {"w": randn(2)}, "payload": Evil()}, OUT / "malicious.ckpt")
    # And the same call as a plain (non-torch) pickle, as some .bin files are.
    with open(OUT / "malicious_plain.pkl", "wb") as f:
        pickle.dump({"payload": Evil()}, f, protocol=2)

    # safetensors written by the reference library.
    st = {
        "f32": randn(3, 4),
        "f16": randn(2, 5, dtype=torch.float16),
        "bf16": randn(6, dtype=torch.bfloat16),
        "f64": randn(2, dtype=torch.float64),
        "i64": torch.tensor([-(2**40), 3]),
        "i32": torch.tensor([7, -7], dtype=torch.int32),
        "i16": torch.tensor([-2, 2], dtype=torch.int16),
        "i8": torch.tensor([-1, 1], dtype=torch.int8),
        "u8": torch.tensor([3, 200], dtype=torch.uint8),
        "bool": torch.tensor([[True], [False]]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(2, 0),
    }
    safetensors.torch.save_file(st, OUT / "mixed.safetensors", metadata={"format": "pt", "note": "fixture"})
    expected_npz(OUT / "mixed.expected.npz", st)
    half = {"unet.w": randn(4, 4, dtype=torch.float16), "unet.b": randn(4, dtype=torch.bfloat16)}
    safetensors.torch.save_file(half, OUT / "half.safetensors")
    expected_npz(OUT / "half.expected.npz", half)

    for path in sorted(OUT.iterdir()):
        print(f"{path.name:32s} {path.stat().st_size:6d} bytes")


if __name__ == "__main__":
    main()
