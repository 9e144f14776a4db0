"""The flow form of DPMSolverMultistepScheduler survives reading and writing, and SD3 folders run the
scheduler their files name (diffusers instantiates model_index.json's class with scheduler_config.json's
options)."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from tf_diffusion import StableDiffusion
from tf_diffusion.schedulers import config_from_diffusers, get_sampler
from tf_diffusion.schedulers.flow_match import FlowDPMSolverMultistep, FlowMatchHeun
from tf_diffusion.weights.diffusers_configs import sampler_from_diffusers
from tf_diffusion.weights.diffusers_folder import scheduler_config_to_diffusers

SD3_FOLDER = pathlib.Path(__file__).parent / "fixtures" / "sd3" / "sd3-diffusers"
# What diffusers' DPMSolverMultistepScheduler takes for its flow form (SD3 / Sana style).
FLOW_DPM = {
    "_class_name": "DPMSolverMultistepScheduler",
    "use_flow_sigmas": True,
    "prediction_type": "flow_prediction",
    "flow_shift": 3.0,
    "algorithm_type": "sde-dpmsolver++",
}


def test_flow_dpm_is_read_as_the_flow_sampler_and_written_back():
    config = config_from_diffusers(FLOW_DPM)
    assert config.use_flow_sigmas and config.shift == 3.0
    assert sampler_from_diffusers(FLOW_DPM) == "flow_dpmpp_2m_sde"
    assert sampler_from_diffusers({**FLOW_DPM, "algorithm_type": "dpmsolver++"}) == "flow_dpmpp_2m"
    # The class name alone, with the flow options, is the flow form too.
    assert isinstance(get_sampler("DPMSolverMultistepScheduler", config), FlowDPMSolverMultistep)
    written = scheduler_config_to_diffusers(config, sampler="flow_dpmpp_2m_sde")
    for key, value in FLOW_DPM.items():
        assert written[key] == value, key
    assert "shift" not in written  # the class's name for it is flow_shift
    assert config_from_diffusers(written) == config
    # The variance-preserving form writes no flow keys.
    plain = scheduler_config_to_diffusers(config_from_diffusers({}), sampler="dpmpp_2m")
    assert "use_flow_sigmas" not in plain and "flow_shift" not in plain
    assert sampler_from_diffusers({"_class_name": "DPMSolverMultistepScheduler"}) == "dpmpp_2m"


def _with_scheduler(tmp_path, data, index_class=None):
    copy = tmp_path / "sd3"
    shutil.copytree(SD3_FOLDER, copy)
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(data))
    if index_class:
        index = json.loads((copy / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", index_class]
        (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_sd3_folder_runs_the_scheduler_it_names(tmp_path):
    sd = StableDiffusion.from_pretrained(_with_scheduler(tmp_path, FLOW_DPM, "DPMSolverMultistepScheduler"))
    assert sd.config.default_sampler == "flow_dpmpp_2m_sde" and sd.config.scheduler.use_flow_sigmas
    assert isinstance(sd.hooks.sampler(sd.config, None, (8, 8, 16)), FlowDPMSolverMultistep)


def test_sd3_folder_model_index_class_wins(tmp_path):
    data = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 2.0}
    sd = StableDiffusion.from_pretrained(_with_scheduler(tmp_path, data, "FlowMatchHeunDiscreteScheduler"))
    sampler = sd.hooks.sampler(sd.config, None, (8, 8, 16))
    assert isinstance(sampler, FlowMatchHeun) and sampler.config.shift == 2.0


def test_sd3_folder_refuses_a_non_flow_scheduler(tmp_path):
    folder = _with_scheduler(tmp_path, {"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler")
    with pytest.raises(ValueError, match="'euler' is not a flow-matching scheduler"):
        StableDiffusion.from_pretrained(folder)


def test_the_released_sd3_scheduler_is_unchanged():
    sd = StableDiffusion.from_pretrained(SD3_FOLDER)
    assert sd.config.default_sampler == "flow_euler"  # FlowMatchEulerDiscreteScheduler's registry name
    assert sd.config.scheduler.shift == 3.0 and not sd.config.scheduler.use_flow_sigmas
    assert np.isfinite(sd.config.scheduler.shift)
