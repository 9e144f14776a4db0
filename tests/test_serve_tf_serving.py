"""``tf-diffusion serve --backend tf-serving://``: the A1111 API answered by a TF Serving deployment.

The tiny-shapes model is exported (32x32, DDIM, 3 steps) and served by a stand-in of TF Serving's REST API
(tests/tf_serving_standin.py: TF Serving's binary cannot be installed here); the real ``webuiapi`` client
talks to our server, which sends each text-to-image request to it. Images equal a local ``generate()`` with
the same seeds within 2/255 (the export's graph against generate()'s, as tests/test_export.py bounds them).
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

webuiapi = pytest.importorskip("webuiapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tf_serving_standin import StandIn  # noqa: E402

from tf_diffusion.serve import (  # noqa: E402
    ModelRegistry,
    Server,
    ServerState,
    tf_serving,  # noqa: E402
)

SIZE, STEPS, SAMPLER = 32, 3, "ddim"


@pytest.fixture(scope="module")
def local():
    from tf_diffusion.models import resolve_model
    from tf_diffusion.pipeline import StableDiffusion

    return StableDiffusion.from_pretrained(resolve_model("tiny-shapes"))


@pytest.fixture(scope="module")
def standin(local, tmp_path_factory):
    from tf_diffusion.export import export_saved_model

    base = tmp_path_factory.mktemp("served") / "tiny"
    export_saved_model(local, base, sampler=SAMPLER, num_steps=STEPS, height=SIZE, width=SIZE)
    with StandIn(base, "tiny") as server:
        yield server


@pytest.fixture(scope="module")
def url(standin):
    return f"tf-serving://127.0.0.1:{standin.port}/tiny"


@pytest.fixture(scope="module")
def server(url):
    registry = ModelRegistry(url)
    registry.load()
    srv = Server(ServerState(registry, queue_size=2, webui=False), port=0).start()
    yield srv
    srv.stop()


def _local(sd, **kwargs):
    return np.asarray(
        sd.generate(
            height=SIZE,
            width=SIZE,
            num_steps=STEPS,
            scheduler=SAMPLER,
            progress=False,
            jit_compile=False,
            **kwargs,
        )
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tf-serving://localhost:8501/sd15", ("localhost", 8501, "sd15", None)),
        ("tf-serving://10.0.0.2:9000/my_model/versions/3", ("10.0.0.2", 9000, "my_model", 3)),
        ("tf-serving://[::1]:8501/m/", ("[::1]", 8501, "m", None)),
    ],
)
def test_backend_urls(value, expected):
    backend = tf_serving.parse_backend(value)
    assert (backend.host, backend.port, backend.model, backend.version) == expected
    assert tf_serving.parse_backend(backend.url) == backend


@pytest.mark.parametrize(
    "value",
    [
        "http://localhost:8501/sd15",
        "tf-serving://localhost/sd15",
        "tf-serving://localhost:8501",
        "tf-serving://localhost:0/sd",
        "tf-serving://localhost:70000/sd",
        "tf-serving://localhost:8501/../x",
        "tf-serving://localhost:8501/m/versions/0",
    ],
)
def test_bad_backend_urls_are_named(value):
    with pytest.raises(ValueError, match="must") as info:
        tf_serving.parse_backend(value)
    assert repr(value) in str(info.value)


def test_remote_model_equals_local_generate(local, url, standin):
    model = tf_serving.TFServingModel(url)
    assert (model.description["sampler"], model.description["num_steps"]) == (SAMPLER, STEPS)
    assert model.config == local.config
    result = model.generate(
        ["a red circle", "a blue star"], "blurry", num_images=2, seed=7, guidance_scale=4.0
    )
    assert result.shape == (4, SIZE, SIZE, 3) and result.info.seeds == (7, 8, 9, 10)
    assert result.info.prompts == ("a red circle", "a red circle", "a blue star", "a blue star")
    expected = np.concatenate(
        [
            _local(local, prompt=p, negative_prompt="blurry", seed=s, num_images=2, guidance_scale=4.0)
            for p, s in (("a red circle", 7), ("a blue star", 9))
        ]
    )
    assert np.abs(result.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(result[0].astype(int) - result[1].astype(int)).max() > 10  # each row its own seed
    signature, inputs = standin.calls[-1]
    assert signature == "serving_default" and inputs["seed"] == [7, 8, 9, 10]


def test_remote_model_refuses_what_the_export_did_not_fix(url):
    model = tf_serving.TFServingModel(url)
    served = "ddim, 3 steps, 32x32"
    with pytest.raises(ValueError, match=f"num_steps=5: this backend serves {served} only"):
        model.generate("a red circle", num_steps=5)
    with pytest.raises(ValueError, match=f"height=64, width=32: this backend serves {served} only"):
        model.generate("a red circle", height=64)
    from tf_diffusion.schedulers import get_sampler

    with pytest.raises(ValueError, match="sampler 'euler'"):
        model.generate("a red circle", scheduler=get_sampler("euler", model.config.scheduler))
    with pytest.raises(ValueError, match="image= .* not available through the TF Serving backend"):
        model.generate("a red circle", image=np.zeros((SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match="<lora:...> tag"):
        model.generate("a red circle <lora:x:1>")


def test_unreachable_or_missing_model_is_a_clear_error(standin):
    with pytest.raises(tf_serving.BackendError, match="refused signature 'describe' .*HTTP 404.*Servable"):
        tf_serving.TFServingModel(f"tf-serving://127.0.0.1:{standin.port}/other")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        tf_serving.BackendError, match=f"127.0.0.1:{port}/v1/models/tiny:predict did not answer"
    ):
        tf_serving.TFServingModel(f"tf-serving://127.0.0.1:{port}/tiny")


def test_webuiapi_through_the_backend(server, local):
    api = webuiapi.WebUIApi(port=server.port)
    result = api.txt2img(
        prompt="a green square",
        negative_prompt="blurry",
        seed=21,
        batch_size=2,
        n_iter=2,
        width=SIZE,
        height=SIZE,
        steps=STEPS,
        cfg_scale=5,
        sampler_name="DDIM",
    )
    assert result.info["all_seeds"] == [21, 22, 23, 24]
    expected = _local(
        local, prompt="a green square", negative_prompt="blurry", seed=21, num_images=4, guidance_scale=5.0
    )
    for b in range(4):
        got = np.asarray(result.images[b].convert("RGB")).astype(int)
        assert np.abs(got - expected[b].astype(int)).max() <= 2
    text = result.images[3].info["parameters"]
    assert text.startswith("a green square\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 5")
    assert "Seed: 24, Size: 32x32" in text and "Model: tiny" in text
    assert [m["title"] for m in api.get_sd_models()] == ["tiny"]
    # what the export did not fix: a clear 422 naming the served values, and the server goes on serving
    client = httpx.Client(base_url=server.url, timeout=120)
    wrong = client.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "a red circle", "steps": 20, "width": SIZE, "height": SIZE, "sampler_name": "DDIM"},
    )
    assert (
        wrong.status_code == 422 and "this backend serves ddim, 3 steps, 32x32 only" in wrong.json()["detail"]
    )
    image = result.images[0]
    img2img = client.post(
        "/sdapi/v1/img2img",
        json={
            "prompt": "a red circle",
            "steps": STEPS,
            "width": SIZE,
            "height": SIZE,
            "sampler_name": "DDIM",
            "init_images": [webuiapi.raw_b64_img(image)],
        },
    )
    assert (
        img2img.status_code == 422
        and "not available through the TF Serving backend" in img2img.json()["detail"]
    )
    again = api.txt2img(
        prompt="a red circle", seed=3, width=SIZE, height=SIZE, steps=STEPS, sampler_name="DDIM"
    )
    assert again.info["all_seeds"] == [3]


def _serve_args(*argv):
    from tf_diffusion.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers())
    return serve_cli, parser.parse_args(["serve", *argv])


def test_cli_backend_checks(tmp_path):
    from tf_diffusion.cli._common import UsageError

    cli, args = _serve_args("--backend", "tf-serving://localhost:8501/sd", "--nowebui")
    assert cli.check_arguments(args) == ("tf-serving://localhost:8501/sd", None)
    cli, args = _serve_args("--backend", "http://localhost:8501/sd")
    with pytest.raises(UsageError, match="--backend: backend 'http://localhost:8501/sd'"):
        cli.check_arguments(args)
    cli, args = _serve_args("--backend", "tf-serving://localhost:8501/sd", "--lora-dir", str(tmp_path))
    with pytest.raises(UsageError, match="--lora-dir cannot be used with it"):
        cli.check_arguments(args)
