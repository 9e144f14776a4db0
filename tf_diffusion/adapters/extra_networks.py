"""The web UI's "extra networks" in prompts: ``<lora:name:weight>`` tags, LoRA folders and short hashes.

Tag syntax (AUTOMATIC1111, ``extensions-builtin/Lora``): ``<lora:NAME>``, ``<lora:NAME:W>`` (text encoder
and UNet both ``W``), ``<lora:NAME:TE:UNET>``, and the named forms ``te=`` / ``unet=``
(``<lora:NAME:0.5:unet=0.8>``); a weight left out is 1.0 and a missing UNet weight is the text encoder's.
``<lyco:...>`` (the old LyCORIS extension's tag) means the same. Tags are removed from the text before it is
encoded, as the web UI removes them (the surrounding text, commas included, stays as written); the prompt
recorded in the PNG parameters keeps them, as the web UI's does.

Names resolve in a LoRA folder (searched with its subfolders) by file stem, else by the ``ss_output_name``
that kohya's sd-scripts writes into a safetensors header. A name found nowhere is an error naming it and
the folder.

Hashes, as the web UI writes them after ``Lora hashes:`` / ``TI hashes:``: a LoRA's is the header's
``sshs_model_hash`` when present, else the SHA-256 of a safetensors file's tensor bytes (everything after
the 8-byte length and the JSON header: the "addnet" hash, which metadata edits do not change), else of the
whole file; an embedding's is the SHA-256 of the whole file; both cut to their first 12 hex digits.

Everything here but ``prepare`` imports only the standard library, so the command line checks tags and
folders before TensorFlow is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

LORA_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt", ".pth")
LORA_KINDS = ("lora", "lyco")
HASH_CHARS = 12
# The web UI's extra-network tag: <kind:arguments>, arguments split at ":".
_TAG = re.compile(r"<(\w+):([^>]+)>")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors headers above this are not read for names
_HASHES: dict[tuple, str] = {}  # (kind, path, size, mtime_ns) -> hash


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: the name as written and its text-encoder and UNet weights."""

    name: str
    text_encoder: float
    unet: float

    @property
    def weights(self) -> dict[str, float]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{tag}: weight {text!r} is not a finite number")
    return value


def _parse_tag(kind: str, arguments: str, tag: str) -> LoraTag:
    if kind not in LORA_KINDS:
        raise ValueError(
            f"{tag}: <{kind}:...> networks are not supported; allowed tags: <lora:...>, <lyco:...>"
        )
    positional, named = [], {}
    for item in arguments.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(item)
    extra = sorted(set(named) - {"te", "unet"})
    if extra or len(positional) > 3 or not positional or not positional[0]:
        raise ValueError(
            f"{tag}: expected <lora:NAME>, <lora:NAME:WEIGHT>, <lora:NAME:TE_WEIGHT:UNET_WEIGHT> "
            f"(or te= / unet=); {'named ' + str(extra) if extra else 'got ' + str(len(positional)) + ' fields'}"
        )
    te = _weight(positional[1], tag) if len(positional) > 1 else 1.0
    te = _weight(named["te"], tag) if "te" in named else te
    unet = _weight(positional[2], tag) if len(positional) > 2 else te
    unet = _weight(named["unet"], tag) if "unet" in named else unet
    return LoraTag(positional[0], te, unet)


def parse_lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """Remove the extra-network tags of one prompt.

    Args:
        prompt: the prompt as written.

    Returns:
        (the text to encode, the tags in order of appearance).

    Raises:
        ValueError: a tag of another kind (``<hypernet:...>``), one without a name, a weight that is
            not a number, or the same LoRA named twice with different weights.

    Example:
        >>> parse_lora_tags("a cat <lora:ink:0.8>, sketch")
        ('a cat , sketch', (LoraTag(name='ink', text_encoder=0.8, unet=0.8),))
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    tags: dict[str, LoraTag] = {}

    def found(match: re.Match) -> str:
        tag = _parse_tag(match.group(1), match.group(2), match.group(0))
        if tag.name in tags and tags[tag.name] != tag:
            raise ValueError(f"LoRA {tag.name!r} is named twice with different weights in {prompt!r}")
        tags[tag.name] = tag
        return ""

    text = _TAG.sub(found, prompt)
    return text, tuple(tags.values())


def strip_prompts(
    prompts: Sequence[str], negatives: Sequence[str]
) -> tuple[list[str], list[str], tuple[LoraTag, ...]]:
    """Remove the tags of a batch's prompts and negative prompts; the LoRAs they name apply to all images.

    Returns:
        (prompts to encode, negative prompts to encode, the tags: those of the prompts, then those only
        the negative prompts name).

    Raises:
        ValueError: prompts of one batch that name different LoRAs (they share one model), a LoRA with
            two different weights, or a bad tag (see ``parse_lora_tags``).
    """
    texts, sets = zip(*(parse_lora_tags(p) for p in prompts), strict=True)
    if any(set(s) != set(sets[0]) for s in sets):
        raise ValueError(
            "the prompts of one batch name different LoRAs "
            f"({[sorted(t.name for t in s) for s in sets]}); the LoRAs apply to the whole batch, so give "
            "every prompt the same <lora:...> tags or generate them separately"
        )
    tags = {t.name: t for t in sets[0]}
    negative_texts = []
    for negative in negatives:
        text, found = parse_lora_tags(negative)
        negative_texts.append(text)
        for tag in found:
            if tags.setdefault(tag.name, tag) != tag:
                raise ValueError(
                    f"LoRA {tag.name!r} has different weights in the prompt and the negative prompt"
                )
    return list(texts), negative_texts, tuple(tags.values())


# ------------------------------------------------------------------------------------- LoRA folders


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, read with the standard library alone; {} when unreadable.

    Only for names and hashes: a file this cannot read is reported by the real reader when it is loaded.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= _MAX_HEADER:
                return {}
            header = json.loads(f.read(size).decode("utf-8"))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            return {}
        return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}


class LoraFolder:
    """A folder of LoRA files, searched with its subfolders, that ``<lora:NAME>`` tags name.

    Args:
        path: the folder.

    Raises:
        FileNotFoundError: no such folder.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"LoRA folder {str(self.path)!r} does not exist (or is not a folder)")

    def files(self) -> list[pathlib.Path]:
        """Every LoRA file under the folder, sorted."""
        return sorted(p for p in self.path.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())

    def find(self, name: str) -> pathlib.Path:
        """The file ``<lora:name>`` means: by file stem, else by ``ss_output_name``.

        Raises:
            ValueError: no file has that name, or several have it (all listed).
        """
        files = self.files()
        matches = [p for p in files if p.stem == name]
        if not matches:
            matches = [
                p
                for p in files
                if p.suffix.lower() == ".safetensors"
                and safetensors_metadata(p).get("ss_output_name") == name
            ]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ValueError(
                f"<lora:{name}>: several files in LoRA folder {str(self.path)!r} have that name: "
                + ", ".join(str(p.relative_to(self.path)) for p in matches)
            )
        known = sorted({p.stem for p in files})
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        raise ValueError(
            f"<lora:{name}>: no LoRA named {name!r} in folder {str(self.path)!r} (by file stem or "
            f"ss_output_name); available: {shown or 'none'}"
        )


def resolve_tags(
    tags: Sequence[LoraTag], folder: str | os.PathLike | None
) -> list[tuple[LoraTag, pathlib.Path]]:
    """Each tag with its file.

    Raises:
        ValueError: tags but no folder, or a name not in the folder (see ``LoraFolder.find``).
        FileNotFoundError: a folder that does not exist.
    """
    if not tags:
        return []
    if folder is None:
        names = ", ".join(f"<lora:{t.name}>" for t in tags)
        raise ValueError(
            f"the prompt names LoRAs ({names}) but no LoRA folder is set (sd.lora_dir / --lora-dir)"
        )
    lora_folder = LoraFolder(folder)
    return [(tag, lora_folder.find(tag.name)) for tag in tags]


# ------------------------------------------------------------------------------------------- hashes


def _cached(kind: str, path: pathlib.Path, compute) -> str:
    stat = path.stat()
    key = (kind, str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = compute()
    return _HASHES[key]


def _sha256(path: pathlib.Path, start: int = 0) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_hash(path: str | os.PathLike) -> str:
    """The web UI's short hash of a LoRA file (see the module docstring): 12 lower-case hex digits."""
    path = pathlib.Path(path)

    def compute() -> str:
        if path.suffix.lower() != ".safetensors":
            return _sha256(path)
        stored = safetensors_metadata(path).get("sshs_model_hash")
        if stored:
            return stored.lower()
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        return _sha256(path, 8 + header)

    return _cached("lora", path, compute)[:HASH_CHARS]


def embedding_hash(path: str | os.PathLike) -> str:
    """The web UI's short hash of an embedding file: the SHA-256 of the file, 12 hex digits."""
    path = pathlib.Path(path)
    return _cached("ti", path, lambda: _sha256(path))[:HASH_CHARS]


def hash_list(entries: Sequence[tuple[str, str]]) -> str:
    """``name: hash, name: hash`` as the web UI writes it (":" and "," removed from names)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in entries)


# ------------------------------------------------------------------------------------ for generate()


def prepare(sd, prompts: Sequence[str], negatives: Sequence[str]) -> tuple[list[str], list[str], dict]:
    """Before a generation: remove the tags, merge the LoRAs they name, and name what the images used.

    The LoRAs named in prompts stay merged after the call, so the same set asked again costs nothing;
    a call that names another set (or none) switches them to that set. LoRAs loaded with
    ``load_lora_weights`` and active stay active alongside.

    Args:
        sd: the ``StableDiffusion`` (its ``lora_dir`` is the folder the tags name).
        prompts, negatives: as written, one per prompt.

    Returns:
        (prompts to encode, negative prompts to encode, PNG parameter fields: "Lora hashes" for every
        active LoRA (prompt-named ones by the name written, others by file stem) and "TI hashes" for
        the embeddings the texts use).

    Raises:
        ValueError: see ``strip_prompts`` and ``resolve_tags``; a LoRA file's errors (``LoraError``).
            On any error the model is unchanged.
    """
    texts, negative_texts, tags = strip_prompts(prompts, negatives)
    resolved = resolve_tags(tags, getattr(sd, "lora_dir", None))
    params = {}
    from tf_diffusion.adapters import lora

    if resolved or lora.has_prompt_loras(sd):
        lora.use_prompt_loras(sd, resolved)
    entries = lora.active_sources(sd)
    if entries:
        params["Lora hashes"] = hash_list([(name, lora_hash(path)) for name, path in entries])
    from tf_diffusion.adapters import textual_inversion

    used = textual_inversion.used_embeddings(sd, [*texts, *negative_texts])
    if used:
        params["TI hashes"] = hash_list([(name, embedding_hash(path)) for name, path in used])
    return texts, negative_texts, params
