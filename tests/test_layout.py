"""The block layouts (tf_diffusion.layout) against diffusers' own models and the original numbering.

The diffusers names and channel counts are checked against weights diffusers wrote
(tests/fixtures/unet/*_weights.npz, tests/fixtures/vae/*.npz, from tools/make_fixtures_*.py):
every module diffusers has is a layout entry with the widths of its weights, and no other.
The single-file paths are checked against the original LDM numbering as full-size checkpoints
spell it (SD 1.5's ``input_blocks.3.0.op``, ``output_blocks.2.1.conv``, ...).
"""

import json
import re

import numpy as np
import pytest

from tf_diffusion.config import UNetConfig, VAEConfig, from_dict
from tf_diffusion.layout import UNET_TOP, level_sizes, resblock_input_sizes, unet_layout, vae_layout
from tf_diffusion.weights.diffusers_unet import unet_config_from_diffusers

_UNET_MODULE = re.compile(
    r"^((?:down|up)_blocks\.\d+\.(?:resnets|attentions|downsamplers|upsamplers)\.\d+"
    r"|mid_block\.(?:resnets|attentions)\.\d+|time_embedding\.linear_[12]|conv_in|conv_norm_out|conv_out)\."
)
_VAE_MODULE = re.compile(
    r"^((?:encoder|decoder)\.(?:(?:down|up)_blocks\.\d+\.(?:resnets|downsamplers|upsamplers)\.\d+"
    r"|mid_block\.(?:resnets|attentions)\.\d+|conv_in|conv_out|conv_norm_out)|quant_conv|post_quant_conv)\."
)


@pytest.mark.parametrize("name", ["sd1", "sd2", "inpaint"])
def test_unet_layout_names_diffusers_modules(fixtures_dir, name):
    config = unet_config_from_diffusers(
        json.loads((fixtures_dir / "unet" / f"{name}_config.json").read_text())
    )
    weights = np.load(fixtures_dir / "unet" / f"{name}_weights.npz")
    modules = {_UNET_MODULE.match(k).group(1) for k in weights.keys()}
    layout = unet_layout(config)
    assert {b.diffusers for b in layout} | set(UNET_TOP.values()) == modules
    for block in layout:
        if block.kind == "res":
            out_ch, in_ch = weights[f"{block.diffusers}.conv1.weight"].shape[:2]
            assert (block.in_channels, block.out_channels) == (in_ch, out_ch), block.path
        elif block.kind in ("down", "up"):
            assert weights[f"{block.diffusers}.conv.weight"].shape[:2] == (
                block.out_channels,
                block.in_channels,
            )
        elif block.kind == "attn":
            assert weights[f"{block.diffusers}.norm.weight"].shape == (block.in_channels,)
        else:
            assert weights["conv_in.weight"].shape[:2] == (block.out_channels, block.in_channels)


@pytest.mark.parametrize("name", ["vae_2level", "vae_3level"])
def test_vae_layout_names_diffusers_modules(fixtures_dir, name):
    with np.load(fixtures_dir / "vae" / f"{name}.npz") as data:
        config = from_dict(VAEConfig, json.loads(str(data["config"])))
        shapes = {k[len("param/") :]: data[k].shape for k in data.keys() if k.startswith("param/")}
    modules = {_VAE_MODULE.match(k).group(1) for k in shapes}
    layout = vae_layout(config)
    assert {b.diffusers for b in layout} == modules
    for block in layout:
        conv = {"res": "conv1", "down": "conv", "up": "conv"}.get(block.kind)
        if conv is not None:
            out_ch, in_ch = shapes[f"{block.diffusers}.{conv}.weight"][:2]
            assert (block.in_channels, block.out_channels) == (in_ch, out_ch), block.path
        elif block.kind in ("conv", "quant"):
            assert shapes[f"{block.diffusers}.weight"][:2] == (block.out_channels, block.in_channels)


def test_sd15_single_file_paths():
    layout = unet_layout(UNetConfig())
    by_name = {b.diffusers: b.path for b in layout}
    # Module paths of the original SD 1.5 checkpoint (v1-5-pruned.ckpt, model.diffusion_model.*).
    assert by_name["conv_in"] == "input_blocks.0.0"
    assert by_name["down_blocks.0.resnets.1"] == "input_blocks.2.0"
    assert by_name["down_blocks.0.downsamplers.0"] == "input_blocks.3.0"
    assert by_name["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert by_name["down_blocks.3.resnets.1"] == "input_blocks.11.0"
    assert by_name["mid_block.attentions.0"] == "middle_block.1"
    assert by_name["up_blocks.0.upsamplers.0"] == "output_blocks.2.1"
    assert by_name["up_blocks.1.upsamplers.0"] == "output_blocks.5.2"
    assert by_name["up_blocks.3.attentions.2"] == "output_blocks.11.1"
    assert [b.in_channels for b in layout if b.section == "output" and b.kind == "res"][:3] == [
        2560,
        2560,
        2560,
    ]
    # SD 1.5's output_blocks.9.0.in_layers.0.weight has 960 entries: 640 from below + a 320-wide skip.
    outputs = [b.in_channels for b in layout if b.section == "output" and b.kind == "res"]
    assert outputs[-3:] == [960, 640, 640]
    vae = {b.diffusers: b.path for b in vae_layout(VAEConfig())}
    assert vae["decoder.up_blocks.0.upsamplers.0"] == "decoder.up.3.upsample"
    assert vae["decoder.up_blocks.3.resnets.2"] == "decoder.up.0.block.2"
    assert vae["encoder.down_blocks.2.downsamplers.0"] == "encoder.down.2.downsample"


def test_resblock_input_sizes_follow_odd_sizes():
    # A stride-2 conv with padding 1 rounds odd sizes up: 9 -> 5 -> 3.
    assert level_sizes(3, 9, 8) == [(9, 8), (5, 4), (3, 2)]
    config = UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(False, True, True)
    )
    sizes = resblock_input_sizes(config, 9, 8)
    assert [b.path for b, _ in sizes] == [
        "input_blocks.1.0",
        "input_blocks.3.0",
        "input_blocks.5.0",
        "middle_block.0",
        "middle_block.2",
        *(f"output_blocks.{i}.0" for i in range(6)),
    ]
    assert [s for _, s in sizes] == [(9, 8), (5, 4), (3, 2), (3, 2), (3, 2)] + [(3, 2)] * 2 + [(5, 4)] * 2 + [
        (9, 8)
    ] * 2


def test_layout_paths_are_the_built_models_modules():
    from tf_diffusion.layout import module_at
    from tf_diffusion.unet import Downsample, ResBlock, SpatialTransformer, UNetModel, Upsample
    from tf_diffusion.weights.state_dict import build_abstract

    config = UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False), num_heads=2
    )
    model = build_abstract(lambda: UNetModel(config))
    kinds = {"res": ResBlock, "attn": SpatialTransformer, "down": Downsample, "up": Upsample}
    for block, _ in resblock_input_sizes(config, 8, 8):
        layer = module_at(model, block.path)
        assert (layer.skip_connection is not None) == (block.in_channels != block.out_channels), block.path
    for block in unet_layout(config):
        if block.kind in kinds:
            assert isinstance(module_at(model, block.path), kinds[block.kind]), block.path
    with pytest.raises(ValueError, match="input_blocks.9"):
        module_at(model, "input_blocks.9.0")
