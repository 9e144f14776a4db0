"""Hub ids: found in a Hugging Face cache that the test builds (offline), or fetched selectively (online)."""

import hashlib
import shutil
import sys
import types

import numpy as np
import pytest

from tf_diffusion.weights import hub
from tf_diffusion.weights.loading import load_pipeline_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# The files of runwayml/stable-diffusion-v1-5 (abridged): two multi-GB single files at the top.
SD15_FILES = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]


def build_cache(cache, repo_id, folder, revision="main"):
    """Lay ``folder`` out as huggingface_hub does: blobs by hash, snapshot symlinks, a ref file."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, fixtures_dir):
    cache = tmp_path / "hub"
    build_cache(cache, "tiny-org/tiny-sd", fixtures_dir / "checkpoints" / "sd1-diffusers")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_offline_hub_id_loads_from_cache(offline_cache, fixtures_dir):
    with load_pipeline_weights(fixtures_dir / "checkpoints" / "sd1-diffusers") as local:
        want_config = local.config
        key = "input_blocks.1.1.proj_in.weight"
        want = np.asarray(local.components["unet"][key])
    with load_pipeline_weights("tiny-org/tiny-sd") as cached:
        assert cached.report.source == "tiny-org/tiny-sd"
        assert cached.report.path.endswith(f"snapshots/{COMMIT}")
        assert cached.config == want_config.replace(name="tiny-org/tiny-sd")
        np.testing.assert_array_equal(np.asarray(cached.components["unet"][key]), want)
    # A commit hash is a revision too; the fp16 variant is in the cache as well.
    with load_pipeline_weights("tiny-org/tiny-sd", revision=COMMIT, variant="fp16") as cached:
        assert cached.report.dtypes["unet"] == "float16"


def test_from_pretrained_with_hub_id_offline(offline_cache):
    from tf_diffusion.pipeline import StableDiffusion
    from tf_diffusion.weights.loading import from_pretrained

    sd = from_pretrained(StableDiffusion, "tiny-org/tiny-sd")
    assert sd.load_report.format == "diffusers"
    assert sd.config.unet.model_channels == 8


def test_cache_location_from_hf_home(tmp_path, monkeypatch, fixtures_dir):
    build_cache(tmp_path / "home" / "hub", "tiny-org/tiny-sd", fixtures_dir / "checkpoints" / "sd1-diffusers")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.cache_dir() == tmp_path / "home" / "hub"
    assert hub.cached_snapshot("tiny-org/tiny-sd") is not None
    assert hub.cached_snapshot("tiny-org/tiny-sd", revision="v2") is None


def test_offline_and_not_cached(offline_cache):
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache .*HF_HUB_OFFLINE"):
        load_pipeline_weights("runwayml/stable-diffusion-v1-5")


def test_cache_works_without_huggingface_hub(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with load_pipeline_weights("tiny-org/tiny-sd") as cached:
        assert cached.report.format == "diffusers"
    with pytest.raises(hub.HubError, match="huggingface_hub is not installed"):
        load_pipeline_weights("other-org/missing")


def test_wanted_files_skip_single_files_and_pick_one_weight_file_each():
    files = hub.wanted_files(SD15_FILES, None)
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert "text_encoder/model.safetensors" in files
    assert not any(f.endswith((".ckpt", ".bin")) for f in files)
    assert not any(
        f.startswith(("safety_checker", "feature_extractor")) or f.count("/") == 0 and f != "model_index.json"
        for f in files
    )
    fp16 = hub.wanted_files(SD15_FILES, "fp16")
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "vae/diffusion_pytorch_model.safetensors" not in fp16
    only_bin = [f for f in SD15_FILES if not f.endswith(".safetensors")]
    assert "unet/diffusion_pytorch_model.bin" in hub.wanted_files(only_bin, None)
    with pytest.raises(hub.HubError, match="no model_index.json"):
        hub.wanted_files(["v1-5-pruned.safetensors"], None)


def test_online_download_fetches_only_wanted_files(tmp_path, monkeypatch, fixtures_dir):
    calls = {}
    snapshot = tmp_path / "snap"
    shutil.copytree(fixtures_dir / "checkpoints" / "sd1-diffusers", snapshot)

    def list_repo_files(repo_id, revision=None):
        return SD15_FILES

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(snapshot)

    fake = types.SimpleNamespace(list_repo_files=list_repo_files, snapshot_download=snapshot_download)
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with load_pipeline_weights("runwayml/stable-diffusion-v1-5") as weights:
        assert weights.report.path == str(snapshot)
    assert calls["repo_id"] == "runwayml/stable-diffusion-v1-5"
    assert "v1-5-pruned-emaonly.ckpt" not in calls["allow_patterns"]
    assert "unet/diffusion_pytorch_model.safetensors" in calls["allow_patterns"]


def _sdxl_repo(text_encoder: bool = True) -> list[str]:
    """stabilityai/stable-diffusion-xl-base-1.0's listing (the refiner's without ``text_encoder``)."""
    files = ["model_index.json", "scheduler/scheduler_config.json", "sd_xl_base_1.0.safetensors", "README.md"]
    for folder, stem in (("text_encoder", "model"), ("text_encoder_2", "model")):
        if folder == "text_encoder" and not text_encoder:
            continue
        files += [
            f"{folder}/config.json",
            f"{folder}/{stem}.safetensors",
            f"{folder}/{stem}.fp16.safetensors",
        ]
        files += [f"{folder}/openvino_model.bin", f"{folder}/model.onnx"]
    for folder in ("tokenizer", "tokenizer_2"):
        if folder == "tokenizer" and not text_encoder:
            continue
        files += [f"{folder}/{n}" for n in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json")]
        files.append(f"{folder}/vocab.json")
    for folder in ("unet", "vae", "vae_1_0"):
        files += [f"{folder}/config.json", f"{folder}/diffusion_pytorch_model.safetensors"]
        files.append(f"{folder}/diffusion_pytorch_model.fp16.safetensors")
    return files


def test_wanted_files_of_sdxl_pipelines_and_single_models():
    base = hub.wanted_files(_sdxl_repo(), "fp16")
    assert "text_encoder_2/model.fp16.safetensors" in base and "tokenizer_2/vocab.json" in base
    assert "text_encoder/model.fp16.safetensors" in base
    assert not any(f.startswith("vae_1_0/") or f.endswith((".onnx", ".bin")) for f in base)
    assert "sd_xl_base_1.0.safetensors" not in base
    refiner = hub.wanted_files(_sdxl_repo(text_encoder=False), None)
    assert "text_encoder_2/model.safetensors" in refiner and not any(
        f.startswith("text_encoder/") for f in refiner
    )
    # madebyollin/sdxl-vae-fp16-fix: a single AutoencoderKL with an LDM copy next to it.
    vae = [
        "config.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors",
        "sdxl_vae.safetensors",
    ]
    assert hub.wanted_files(vae, None) == ["config.json", "diffusion_pytorch_model.safetensors"]
    with pytest.raises(hub.HubError, match="no unet folder"):
        hub.wanted_files(
            ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"], None
        )


def test_sdxl_pipeline_and_vae_hub_ids_offline(tmp_path, monkeypatch, fixtures_dir):
    from tf_diffusion.pipeline import StableDiffusion

    cache = tmp_path / "hub"
    build_cache(cache, "tiny-org/tiny-sdxl", fixtures_dir / "sdxl" / "sdxl-diffusers")
    build_cache(cache, "tiny-org/tiny-vae-fix", fixtures_dir / "vae_file" / "sdxl-vae-fix")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = StableDiffusion.from_pretrained("tiny-org/tiny-sdxl", vae="tiny-org/tiny-vae-fix")
    assert sd.config.is_sdxl and sd.text_encoder_2 is not None
    assert sd.config.vae.force_upcast is False and sd.vae_source.endswith(f"snapshots/{COMMIT}")
