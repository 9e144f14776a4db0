"""Project-level checks: CI runs the README's test command; configs and presets validate input."""

import pathlib
import re

import pytest

from tf_diffusion import PRESETS, PipelineConfig, UNetConfig, get_preset
from tf_diffusion.config import CLIPTextConfig, from_dict, to_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run runs the README's two commands as they are (each may be followed by `|| ...`, which
    records its exit status)."""
    install, test = readme_commands()[:2]
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    for command in (install, test):
        assert any(line == command or line.startswith(command + " ||") for line in ci_lines), command
    assert "pytest" in test and "pytest" not in install


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="sd-v1-5"):
        get_preset("sd-v9")


def test_presets_are_consistent():
    assert {"sd-v1-5", "sd-v1-5-inpainting", "sd-v2-1-base", "sd-v2-1", "sd-v2-inpainting"} <= set(PRESETS)
    assert PRESETS["sd-v2-1"].scheduler.prediction_type == "v_prediction"
    assert PRESETS["sd-v2-1"].default_size == 768
    assert PRESETS["sd-v2-1-base"].tokenizer.pad_token_id == 0
    assert PRESETS["sd-v1-5"].tokenizer.pad_token_id == 49407
    assert PRESETS["sd-v1-5-inpainting"].is_inpainting and not PRESETS["sd-v1-5"].is_inpainting


def test_config_round_trip():
    for cfg in PRESETS.values():
        assert from_dict(PipelineConfig, to_dict(cfg)) == cfg
    from tf_diffusion.config import SD3Config
    from tf_diffusion.presets import SD3_PRESETS

    for cfg in SD3_PRESETS.values():  # what an SD3 SavedModel's describe signature carries
        assert from_dict(SD3Config, to_dict(cfg)) == cfg
    assert (
        from_dict(SD3Config, to_dict(SD3_PRESETS["sd3-medium"].replace(text_encoder_3=None))).text_encoder_3
        is None
    )


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_heads"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="context_dim"):
        PipelineConfig(name="x", unet=UNetConfig(context_dim=1024))
    with pytest.raises(ValueError, match="unknown"):
        from_dict(UNetConfig, {"channels": 3})
