"""Models: the embedded default checkpoint (``gguf``), weight-only quantised layers of the draft
(``quantized``), vocabulary checks (``vocab``), loading a target or a draft (``loading``) and tiny
random models for tests (``tiny``). A target and a draft loaded together from their specs:
``specs.load_pair``. Measurements behind the choices: docs/MODELS_NOTES.md.

This package re-exports the names other modules and the tests use.
"""

from .gguf import DEFAULT_DIRNAME, DEFAULT_LABEL, GGUF_FILE, GGUF_PACKAGE, GGUF_PACKAGE_PIN, cache_dir, default_model_dir, gguf_path
from .loading import DEFAULT_NAME, QUANTIZATIONS, TARGET_DTYPES, load_draft, load_target, resolve_device, target_dtype
from .quantized import INT4_GROUP_SIZE, QuantEmbedding, QuantLinear, model_nbytes, quantize_linear_weights
from .tiny import TINY_ARCHITECTURES, tiny_llama, tiny_model
from .vocab import VocabularyMismatchError, check_vocab_compatible, token_vocab_size, tokenizer_fingerprint

__all__ = [
    "DEFAULT_DIRNAME", "DEFAULT_LABEL", "DEFAULT_NAME", "GGUF_FILE", "GGUF_PACKAGE", "GGUF_PACKAGE_PIN",
    "INT4_GROUP_SIZE", "QUANTIZATIONS", "TARGET_DTYPES", "TINY_ARCHITECTURES",
    "QuantEmbedding", "QuantLinear", "VocabularyMismatchError",
    "cache_dir", "check_vocab_compatible", "default_model_dir", "gguf_path", "load_draft", "load_target",
    "model_nbytes", "quantize_linear_weights", "resolve_device", "target_dtype", "tiny_llama", "tiny_model",
    "token_vocab_size", "tokenizer_fingerprint",
]
