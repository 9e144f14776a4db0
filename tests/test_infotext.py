"""A1111 "parameters" text: writing, reading (ours and the web UI's), sampler names and the model hash.

The web-UI texts below are parameters of images the AUTOMATIC1111 web UI wrote (v1.9.4 and v1.10.1, as
published beside those images); the sampler names are the web UI's own labels.
"""

import hashlib

import pytest

from tf_diffusion.infotext import (
    A1111_SAMPLERS,
    SAMPLERS_FROM_A1111,
    a1111_sampler,
    format_parameters,
    model_hash,
    parse_parameters,
    sampler_from_a1111,
)

WEBUI_194 = (
    "professional product photoshoot of perfume bottle in sand with beach elements, studio lighting, warm weather\n"
    "Negative prompt: incomplete figures\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3001968073, Size: 985x1266, "
    "Model hash: b513c6287d, Model: realism_engine, Denoising strength: 0.75, Mask blur: 2, Version: v1.9.4"
)
WEBUI_1101 = (
    "cat portrait, \n"
    "Negative prompt: \n"
    "Steps: 13, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4, Seed: 2535254266, Face restoration: "
    "CodeFormer, Size: 1216x832, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, FP8 weight: Enable for SDXL, "
    "Cache FP16 weight for LoRA: True, Version: v1.10.1"
)
WEBUI_QUOTED = (
    "<lora:Wisps_of_Light_Pony:0.7>\n"
    "<lora:Add_color_PDXLv1:1>\n"
    "Negative prompt: score_5, score_4, 3d, (angular face:1.3),\n"
    "pointy chin\n"
    "Steps: 30, Sampler: DPM++ 3M SDE, Schedule type: Karras, CFG scale: 5, Seed: 2480865251, Size: 1152x896, "
    'Model hash: c379d154eb, Model: albedobaseXL_v31Large, Lora hashes: "Wisps_of_Light_Pony: 95011c7288d0, '
    'Add_color_PDXLv1: bc21d926bade", dynthres_enabled: True'
)


def test_reads_webui_194():
    got = parse_parameters(WEBUI_194)
    assert got["prompt"].startswith("professional product") and got["prompt"].endswith("warm weather")
    assert got["negative_prompt"] == "incomplete figures"
    assert (got["steps"], got["sampler"], got["cfg_scale"], got["seed"]) == (20, "Euler a", 7.0, 3001968073)
    assert (got["width"], got["height"]) == (985, 1266)
    assert (got["model_hash"], got["model_name"]) == ("b513c6287d", "realism_engine")
    assert got["extra"] == {
        "Schedule type": "Automatic",
        "Denoising strength": "0.75",
        "Mask blur": "2",
        "Version": "v1.9.4",
    }
    assert sampler_from_a1111(got["sampler"], got["extra"]["Schedule type"]) == ("euler_a", {})


def test_reads_webui_1101_with_an_empty_negative_prompt():
    got = parse_parameters(WEBUI_1101)
    assert got["prompt"] == "cat portrait," and got["negative_prompt"] == ""
    assert (got["width"], got["height"], got["seed"]) == (1216, 832, 2535254266)
    assert got["extra"]["Face restoration"] == "CodeFormer"
    assert got["extra"]["Cache FP16 weight for LoRA"] == "True"
    assert sampler_from_a1111(got["sampler"], got["extra"]["Schedule type"]) == ("dpmpp_2m_karras", {})


def test_reads_quoted_values_and_multiline_prompts():
    got = parse_parameters(WEBUI_QUOTED)
    assert got["prompt"] == "<lora:Wisps_of_Light_Pony:0.7>\n<lora:Add_color_PDXLv1:1>"
    assert got["negative_prompt"] == "score_5, score_4, 3d, (angular face:1.3),\npointy chin"
    assert got["extra"]["Lora hashes"] == "Wisps_of_Light_Pony: 95011c7288d0, Add_color_PDXLv1: bc21d926bade"
    assert got["extra"]["dynthres_enabled"] == "True"
    with pytest.raises(ValueError, match="DPM\\+\\+ 3M SDE.*no equivalent"):
        sampler_from_a1111(got["sampler"], got["extra"]["Schedule type"])


def test_text_without_a_parameters_line_is_all_prompt():
    assert parse_parameters("a cat: cute, fluffy") == {
        "prompt": "a cat: cute, fluffy",
        "negative_prompt": "",
        "extra": {},
    }
    assert parse_parameters("") == {"prompt": "", "negative_prompt": "", "extra": {}}


def test_format_matches_the_cli_layout():
    text = format_parameters(
        "a cat",
        "blurry",
        steps=20,
        sampler="dpmpp_2m_karras",
        cfg_scale=7.0,
        seed=1,
        width=64,
        height=64,
        model_name="m",
    )
    assert text == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64, Model: m"
    )


def test_format_quotes_like_the_webui_and_reads_back():
    text = format_parameters(
        "a (red:1.2) circle,\nsecond line",
        "",
        steps=4,
        sampler="EulerAncestralDiscreteScheduler",
        cfg_scale=7.5,
        seed=2**40,
        width=512,
        height=768,
        model_name="sd: v1, pruned",
        model_hash="6ce0161689",
        extra={"Denoising strength": 0.75, "Batch size": 2, "Batch pos": 1, "Note": " padded "},
    )
    assert text.splitlines()[-1] == (
        "Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 1099511627776, Size: 512x768, Model hash: 6ce0161689, "
        'Model: "sd: v1, pruned", Denoising strength: 0.75, Batch size: 2, Batch pos: 1, Note: " padded "'
    )
    got = parse_parameters(text)
    assert got["prompt"] == "a (red:1.2) circle,\nsecond line" and got["model_name"] == "sd: v1, pruned"
    assert got["extra"] == {
        "Denoising strength": "0.75",
        "Batch size": "2",
        "Batch pos": "1",
        "Note": " padded ",
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 2.5}, "steps must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"cfg_scale": float("nan")}, "CFG scale must be a finite number"),
        ({"sampler": "EulerSomething"}, "unknown sampler 'EulerSomething'"),
        ({"extra": {"Steps": 3}}, "repeats a field"),
        ({"extra": {"bad:key": 3}}, "not a web UI key"),
        ({"extra": {"Obj": object()}}, "must be a string or a number"),
        ({"prompt": "ok\nNegative prompt: x"}, "would read back as the negative prompt"),
        ({"prompt": " \n Negative prompt: x"}, "would read back as the negative prompt"),
        ({"prompt": "\ud800"}, "not encodable as UTF-8"),
    ],
)
def test_format_refuses_bad_values(kwargs, message):
    args = dict(prompt="p", steps=20, sampler="euler", cfg_scale=7, seed=1, width=64, height=64) | kwargs
    with pytest.raises(ValueError, match=message):
        format_parameters(**args)


@pytest.mark.parametrize(
    "text, message",
    [
        ("p\nSteps: many, Sampler: Euler, Seed: 1", "Steps: 'many' is not an integer"),
        ("p\nSteps: 1, Size: big, Seed: 1", "Size: 'big' is not WIDTHxHEIGHT"),
        ("p\nSteps: 1, CFG scale: inf, Seed: 1", "CFG scale: 'inf' is not a number"),
        ("p\nSteps: 1, CFG scale: 1e999, Seed: 1", "not a finite number"),
        ("p\nSteps: 1, Seed: " + "9" * 5000 + ", Size: 1x1", "is not an integer"),
    ],
)
def test_parse_names_the_bad_field(text, message):
    with pytest.raises(ValueError, match=message):
        parse_parameters(text)
    with pytest.raises(ValueError, match="must be a string"):
        parse_parameters(b"Steps: 1")


def test_every_sampler_has_a_webui_name_and_back():
    from tf_diffusion.infotext import FLOW_A1111_SAMPLERS
    from tf_diffusion.schedulers import SAMPLERS

    # The flow-matching samplers (SD3, Flux) share the plain web UI names, read back for a flow model.
    assert set(A1111_SAMPLERS) | set(FLOW_A1111_SAMPLERS) == set(SAMPLERS)
    assert not set(A1111_SAMPLERS) & set(FLOW_A1111_SAMPLERS)
    for ours, theirs in A1111_SAMPLERS.items():
        assert a1111_sampler(ours) == (theirs, None)
        assert sampler_from_a1111(theirs) == (ours, {})
        assert a1111_sampler(theirs) == (theirs, None)
    assert len(SAMPLERS_FROM_A1111) == len(A1111_SAMPLERS)
    for ours, theirs in FLOW_A1111_SAMPLERS.items():
        assert a1111_sampler(ours) == (theirs, None)
        assert sampler_from_a1111(theirs, flow=True) == (ours, {})
        assert theirs in SAMPLERS_FROM_A1111  # the same name as a UNet model's sampler
    with pytest.raises(ValueError, match="no flow-matching equivalent"):
        sampler_from_a1111("Euler a", flow=True)


@pytest.mark.parametrize(
    "sampler, config, expected",
    [
        ("EulerDiscreteScheduler", None, ("Euler", None)),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, ("Euler", "Karras")),
        ("euler", {"use_karras_sigmas": True}, ("Euler", "Karras")),
        ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, ("LMS Karras", None)),
        ("PNDMScheduler", None, ("PLMS", None)),
        ("DDIMScheduler", {"use_karras_sigmas": True}, ("DDIM", None)),  # DDIM has no Karras sigmas
        ("DPMSolverMultistepScheduler", {}, ("DPM++ 2M", None)),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, ("DPM++ 2M Karras", None)),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, ("DPM++ 2M SDE", None)),
        ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, ("UniPC", "Karras")),
    ],
)
def test_diffusers_classes_get_webui_names(sampler, config, expected):
    assert a1111_sampler(sampler, config) == expected


def test_scheduler_config_objects_are_read():
    from tf_diffusion.config import SchedulerConfig

    assert a1111_sampler("HeunDiscreteScheduler", SchedulerConfig(use_karras_sigmas=True)) == (
        "Heun",
        "Karras",
    )
    with pytest.raises(ValueError, match="solver_order=3 has no web UI name"):
        a1111_sampler("DPMSolverMultistepScheduler", SchedulerConfig(solver_order=3))


@pytest.mark.parametrize(
    "sampler, schedule, expected",
    [
        ("DPM++ 2M Karras", None, ("dpmpp_2m_karras", {})),
        ("DPM++ 2M", None, ("dpmpp_2m", {})),  # before the web UI had schedule types: its plain schedule
        ("DPM++ 2M", "Uniform", ("dpmpp_2m", {})),
        ("DPM++ 2M", "Automatic", ("dpmpp_2m_karras", {})),  # the web UI's automatic choice for it
        ("DPM++ 2M SDE", "Karras", ("dpmpp_2m_sde_karras", {})),
        ("Euler", "Karras", ("euler", {"use_karras_sigmas": True})),
        ("LMS Karras", None, ("lms", {"use_karras_sigmas": True})),
        ("PLMS", None, ("pndm", {})),
        ("UniPC", "Automatic", ("unipc", {})),
    ],
)
def test_webui_names_map_to_our_samplers(sampler, schedule, expected):
    assert sampler_from_a1111(sampler, schedule) == expected


@pytest.mark.parametrize(
    "sampler, schedule, message",
    [
        ("DPM2", None, "no equivalent here"),
        ("Euler a", "Karras", "allowed schedule types for it"),
        ("DPM++ 2M SDE", "Automatic", "'Exponential' has no equivalent"),
        ("DPM++ 2M Karras", "Uniform", "contradict"),
        ("DDIM", "Exponential", "no equivalent"),
    ],
)
def test_webui_names_without_an_equivalent(sampler, schedule, message):
    with pytest.raises(ValueError, match=message):
        sampler_from_a1111(sampler, schedule)


def test_model_hash_is_the_first_ten_hex_digits_of_sha256(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytes(range(256)) * 9000  # more than one read block
    path.write_bytes(data)
    assert model_hash(path) == hashlib.sha256(data).hexdigest()[:10]
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert model_hash(tmp_path / "empty.ckpt") == "e3b0c44298"  # sha256 of nothing
    with pytest.raises(ValueError, match="not a file"):
        model_hash(tmp_path)


def test_infotext_imports_no_tensorflow():
    import subprocess
    import sys

    code = "import sys, tf_diffusion.infotext; print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- Fuzzing (Hypothesis; TF_DIFFUSION_FUZZ=long runs many more examples) -------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_pieces = st.sampled_from(
    [
        "Steps: ",
        "Sampler: ",
        "Size: ",
        "CFG scale: ",
        "Seed: ",
        "Negative prompt: ",
        "\n",
        ", ",
        ":",
        '"',
        "\\",
        "1",
        "x",
        "512x768",
        "7.5",
        " ",
        "Model: ",
        '"a, b"',
        "\\u12",
        "\r",
    ]
)
_texts = st.one_of(st.text(), st.lists(st.one_of(_pieces, st.text(max_size=5)), max_size=40).map("".join))


@given(_texts)
def test_parse_raises_only_value_error(text):
    try:
        got = parse_parameters(text)
    except ValueError:
        return
    assert isinstance(got["prompt"], str) and isinstance(got["negative_prompt"], str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in got["extra"].items())


_line_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_prompt = (
    st.lists(_line_text, max_size=3)
    .map("\n".join)
    .filter(lambda p: not any(line.startswith("Negative prompt:") for line in p.split("\n")))
)
_key = st.from_regex(r"[A-Za-z][A-Za-z0-9 \-/]{0,12}[A-Za-z0-9]", fullmatch=True)
_value = st.one_of(_line_text, st.integers(-(2**63), 2**63), st.floats(allow_nan=False, allow_infinity=False))


@given(
    prompt=_prompt,
    negative=_prompt,
    steps=st.integers(1, 10_000),
    sampler=st.sampled_from(sorted(A1111_SAMPLERS)),
    cfg=st.floats(-1e6, 1e6, allow_nan=False),
    seed=st.integers(0, 2**64),
    size=st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)),
    name=st.one_of(st.none(), _line_text),
    digest=st.one_of(st.none(), st.text("0123456789abcdef", min_size=10, max_size=10)),
    extra=st.dictionaries(_key, _value, max_size=4),
)
def test_format_then_parse_gives_back_the_values(
    prompt, negative, steps, sampler, cfg, seed, size, name, digest, extra
):
    extra = {
        k: v
        for k, v in extra.items()
        if k not in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Model hash")
    }
    text = format_parameters(
        prompt,
        negative,
        steps=steps,
        sampler=sampler,
        cfg_scale=cfg,
        seed=seed,
        width=size[0],
        height=size[1],
        model_name=name,
        model_hash=digest,
        extra=extra,
    )
    got = parse_parameters(text)
    assert got["prompt"] == prompt.strip()
    if negative.strip():
        assert got["negative_prompt"] == negative.strip()
    assert (got["steps"], got["seed"], got["width"], got["height"]) == (steps, seed, *size)
    assert got["cfg_scale"] == float(cfg)
    assert sampler_from_a1111(got["sampler"]) == (sampler, {})
    assert got.get("model_name") == name and got.get("model_hash") == digest
    assert list(got["extra"]) == list(extra)
    for key, value in extra.items():
        if isinstance(value, str):
            assert got["extra"][key] == value
        elif isinstance(value, float):
            assert float(got["extra"][key]) == value
        else:
            assert int(got["extra"][key]) == value
