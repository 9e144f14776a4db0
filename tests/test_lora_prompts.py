"""``<lora:NAME:WEIGHT>`` in prompts: parsing as the web UI, folder lookup, merging, hashes; the CLI options.

The LoRA files and reference outputs are test_lora's (peft on the tiny pipeline).
"""

import argparse
import hashlib

import numpy as np
import pytest
from test_lora import FIXTURES, build, err, io, te_out, unet_out

from tf_diffusion.adapters import extra_networks as xn
from tf_diffusion.adapters.lora import get_active_adapters, read_lora_file
from tf_diffusion.weights.safetensors_io import save_safetensors
from tf_diffusion.weights.state_dict import state_dict

LORA = FIXTURES / "lora"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    (root / "style.safetensors").write_bytes((LORA / "lora_kohya.safetensors").read_bytes())
    (root / "style_pickled.pt").write_bytes((LORA / "lora_kohya.pt").read_bytes())
    (root / "sub").mkdir()
    tensors, meta = read_lora_file(LORA / "lora_second.safetensors")
    save_safetensors(
        {k: np.asarray(v) for k, v in tensors.items()},
        root / "sub" / "second_v3.safetensors",
        {**meta, "ss_output_name": "second-out"},
    )
    return root


@pytest.fixture(scope="module")
def sd(folder):
    model = build(FIXTURES)
    model.lora_dir = str(folder)
    yield model
    model.unload_lora_weights()


@pytest.fixture(autouse=True)
def clean(sd):
    sd.unload_lora_weights()
    yield
    sd.unload_lora_weights()


def test_tag_syntax_as_the_web_ui():
    text, tags = xn.parse_lora_tags("a cat <lora:ink:0.8>, <lora:b:0.5:0.2> <lyco:c> x <lora:d:0.3:unet=0.9>")
    assert text == "a cat ,   x "
    assert [(t.name, t.text_encoder, t.unet) for t in tags] == [
        ("ink", 0.8, 0.8), ("b", 0.5, 0.2), ("c", 1.0, 1.0), ("d", 0.3, 0.9)
    ]  # fmt: skip
    assert xn.parse_lora_tags("<lora:my style v2:te=0.1>")[1][0] == xn.LoraTag("my style v2", 0.1, 0.1)
    assert xn.parse_lora_tags("<lora:> and <b>")[0] == "<lora:> and <b>"  # not tags: text
    for bad, message in (
        ("<hypernet:h:1>", "not supported"),
        ("<lora:x:abc>", "not a finite number"),
        ("<lora:x:1:2:3:4>", "expected <lora:NAME>"),
        ("<lora:x:1> <lora:x:0.5>", "named twice"),
    ):
        with pytest.raises(ValueError, match=message):
            xn.parse_lora_tags(bad)
    with pytest.raises(ValueError, match="different LoRAs"):
        xn.strip_prompts(["a <lora:x:1>", "b"], ["", ""])


def test_names_resolve_by_stem_then_ss_output_name(folder):
    lora_folder = xn.LoraFolder(folder)
    assert lora_folder.find("style") == folder / "style.safetensors"
    assert lora_folder.find("second-out") == folder / "sub" / "second_v3.safetensors"
    assert lora_folder.find("second_v3") == folder / "sub" / "second_v3.safetensors"
    with pytest.raises(
        ValueError, match=rf"no LoRA named 'nope' in folder '{folder}'.*available: second_v3, style"
    ):
        lora_folder.find("nope")


def test_hashes_as_the_web_ui(folder, tmp_path):
    data = (folder / "style.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert xn.lora_hash(folder / "style.safetensors") == hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    pickled = (folder / "style_pickled.pt").read_bytes()
    assert xn.lora_hash(folder / "style_pickled.pt") == hashlib.sha256(pickled).hexdigest()[:12]
    save_safetensors(
        {"x": np.zeros(2, np.float32)}, tmp_path / "h.safetensors", {"sshs_model_hash": "ABCDEF0123456789"}
    )
    assert xn.lora_hash(tmp_path / "h.safetensors") == "abcdef012345"
    assert xn.hash_list([("a:b,c", "123")]) == "abc: 123"


def test_prompt_loras_merge_with_their_weights_and_stay_while_asked(sd, fixtures_dir, monkeypatch):
    data = io(fixtures_dir)
    texts, negatives, params = xn.prepare(sd, ["a cat <lora:style:0:0.5>"], [""])
    assert texts == ["a cat "] and negatives == [""]
    assert err(unet_out(sd, data), data["unet_lora_0.5"]) <= 1e-4
    assert err(te_out(sd, data), data["te_base"]) <= 1e-4
    digest = xn.lora_hash(sd.lora_dir + "/style.safetensors")
    assert params == {"Lora hashes": f"style: {digest}"}

    _, _, params = xn.prepare(sd, ["<lora:style:0.7> x <lora:second-out:0.4>"], ["y"])
    assert err(unet_out(sd, data), data["unet_two_0.7_0.4"]) <= 1e-4
    assert params["Lora hashes"].startswith(f"style: {digest}, second-out: ")

    # The same set again: nothing is recomputed.
    from tf_diffusion.adapters import lora

    calls = []
    monkeypatch.setattr(lora, "_apply", lambda *a: calls.append(a))
    xn.prepare(sd, ["<lora:second-out:0.4> again <lora:style:0.7>"], [""])
    assert calls == []
    monkeypatch.undo()

    # A prompt without tags switches them off; explicitly loaded LoRAs stay as they are.
    sd.load_lora_weights(LORA / "lora_diffusers.safetensors", adapter_name="mine", weight=0.5)
    xn.prepare(sd, ["plain"], [""])
    assert get_active_adapters(sd) == {"mine": {"unet": 0.5, "text_encoder": 0.5}}
    assert err(unet_out(sd, data), data["unet_lora_0.5"]) <= 1e-4


def test_no_tags_give_the_base_bit_for_bit(sd):
    before = state_dict(sd.unet)
    xn.prepare(sd, ["a <lora:style_pickled:1.3>"], [""])
    assert any(not np.array_equal(v, before[k]) for k, v in state_dict(sd.unet).items())
    xn.prepare(sd, ["a"], [""])
    after = state_dict(sd.unet)
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())


def test_unknown_names_and_no_folder_change_nothing(sd, folder):
    before = state_dict(sd.unet)
    with pytest.raises(ValueError, match=rf"<lora:ghost>: no LoRA named 'ghost' in folder '{folder}'"):
        xn.prepare(sd, ["a <lora:style:1> <lora:ghost:1>"], [""])
    sd.lora_dir = None
    try:
        with pytest.raises(ValueError, match="no LoRA folder is set"):
            xn.prepare(sd, ["a <lora:style:1>"], [""])
    finally:
        sd.lora_dir = str(folder)
    after = state_dict(sd.unet)
    assert all(after[k].tobytes() == v.tobytes() for k, v in before.items())
    assert get_active_adapters(sd) == {}


def test_generate_records_lora_hashes(sd):
    from tf_diffusion.cli.generate import a1111_parameters
    from tf_diffusion.execution import ExecutionOptions

    out = sd.generate(
        "a red circle <lora:style:0.8>", num_steps=1, seed=2, scheduler="ddim", output_type="latent",
        progress=False, execution=ExecutionOptions(compile="eager"),
    )  # fmt: skip
    assert out.info.prompts == ("a red circle <lora:style:0.8>",)  # recorded as written, as the web UI
    digest = xn.lora_hash(sd.lora_dir + "/style.safetensors")
    text = a1111_parameters(out.info, 0, "tiny")
    assert f'Lora hashes: "style: {digest}"' in text
    assert get_active_adapters(sd)["<lora:style>"] == {"unet": 0.8, "text_encoder": 0.8}


def cli_args(**kw):
    base = dict(prompt="x", negative_prompt="", lora=[], lora_dir=None, embedding=[], embedding_dir=None)
    return argparse.Namespace(**{**base, **kw})


def test_cli_adapter_options(sd, folder, fixtures_dir):
    from tf_diffusion.cli._common import UsageError
    from tf_diffusion.cli.generate import apply_adapters, check_adapters, lora_option

    assert lora_option("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert lora_option("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    check_adapters(
        cli_args(
            prompt="a <lora:second-out:0.5>",
            lora_dir=str(folder),
            lora=[str(folder / "style.safetensors:0.3")],
        )
    )
    with pytest.raises(UsageError, match=rf"'ghost' in folder '{folder}'"):
        check_adapters(cli_args(prompt="a <lora:ghost>", lora_dir=str(folder)))
    with pytest.raises(UsageError, match="pass --lora-dir"):
        check_adapters(cli_args(prompt="a <lora:style>"))
    with pytest.raises(FileNotFoundError, match="--lora nowhere.safetensors:0.5: no such file"):
        check_adapters(cli_args(lora=["nowhere.safetensors:0.5"]))
    with pytest.raises(FileNotFoundError, match="--embedding-dir nowhere: no such folder"):
        check_adapters(cli_args(embedding_dir="nowhere"))
    with pytest.raises(UsageError, match="must be a finite number"):
        check_adapters(cli_args(lora=[str(folder / "style.safetensors") + ":nan"]))

    apply_adapters(
        sd,
        cli_args(
            lora=[str(folder / "style.safetensors:0.5")],
            embedding_dir=str(fixtures_dir / "textual_inversion"),
            lora_dir=str(folder),
        ),
    )
    try:
        assert get_active_adapters(sd) == {"style": {"unet": 0.5, "text_encoder": 0.5}}
        from tf_diffusion.adapters.textual_inversion import loaded_embeddings

        assert {"easyneg", "inkwash", "<blob>"} <= set(loaded_embeddings(sd))
    finally:
        sd.unload_textual_inversion()
