"""Policy models and tokenizers: load from a local Hugging Face directory, save, and build tiny ones.

Everything here reads and writes local directories only: nothing is ever downloaded
(`local_files_only=True`), so a typo in a path fails fast instead of reaching for the hub.

The tiny model is a random-init Qwen2 over a character vocabulary (`VOCAB`) that covers the
synthetic tasks (`3+4=` → `7<eos>`): the demo and the tests build it in a second on CPU. Writes
go to a temporary sibling directory that is renamed into place, so a reader never sees a
half-written model, and two processes racing to build the same path both end with one whole copy.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK)
# One token per character; specials first so their ids (0..3) never move when the alphabet grows.
ALPHABET: tuple[str, ...] = tuple(string.digits) + tuple("+-*=,") + (" ",) + tuple(string.ascii_lowercase)
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + ALPHABET

# The config fields a tiny-model spec pins; an existing model must match them to be reused.
_SPEC_TO_CONFIG = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}

# The tiny model for the real engines on CPU (`configs/cluster_vllm.yaml`, `cluster_sglang.yaml`):
# head dim 128 / 2 = 64. The default's 64 / 4 = 16 has no kernel in vLLM's CPU attention
# ("Unsupported CPU attention configuration: head_dim=16"); 64 is one it has.
TINY_HEAD_DIM_64: dict[str, Any] = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 256}


def head_dim(hidden_size: int, num_heads: int, explicit: int | None = None) -> int:
    """Attention head dimension of a Qwen2-style config (`head_dim` when it sets one)."""
    return explicit if explicit else hidden_size // num_heads


def model_head_dim(path: str | os.PathLike) -> int:
    """Head dimension of the model saved at `path`, read from its config.json alone."""
    config = json.loads((Path(path) / "config.json").read_text())
    return head_dim(config["hidden_size"], config["num_attention_heads"], config.get("head_dim"))


_DTYPES = ("bfloat16", "float16", "float32")


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) → torch.dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(_DTYPES)}")
    return getattr(torch, dtype)


# ---------------------------------------------------------------- tokenizer


def build_char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` over `VOCAB` (ids in `VOCAB` order).

    Every character is its own token and decoding concatenates them (no spaces inserted), so
    `decode(encode(s)) == s` for any string over `ALPHABET`; other characters become `<unk>`.
    No BOS/EOS is added on encode: prompts are exactly their characters.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(VOCAB)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # WordLevel would join tokens with spaces
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, bos_token=BOS, unk_token=UNK
    )


# ---------------------------------------------------------------- atomic directory writes


def _write_dir_atomically(path: Path, write, *, replace: bool) -> bool:
    """Run `write(tmp_dir)` then rename tmp_dir to `path`.

    Returns False (and discards the new copy) when `path` appeared meanwhile and `replace` is
    False. With `replace`, the old directory is moved aside first: readers see the old or the new
    model, or briefly none, never a mix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if replace and path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return True
        try:
            os.rename(tmp, path)  # atomic; succeeds onto a missing or empty directory
        except OSError:
            if not (path / "config.json").exists():
                raise
            return False  # another process finished first: theirs is whole, keep it
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- tiny model


def _tiny_config(vocab_size: int, spec: dict[str, Any]):
    from transformers import Qwen2Config

    tok_ids = {tok: i for i, tok in enumerate(VOCAB)}
    return Qwen2Config(
        vocab_size=vocab_size,
        **{cfg_key: spec[key] for key, cfg_key in _SPEC_TO_CONFIG.items()},
        pad_token_id=tok_ids[PAD],
        eos_token_id=tok_ids[EOS],
        bos_token_id=tok_ids[BOS],
    )


def build_tiny_model(
    path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random-init Qwen2ForCausalLM + char tokenizer to `path` (replacing what is there).

    Weights are a pure function of the arguments (the global torch RNG is left untouched).
    Embeddings are untied by default: a tied `lm_head` is an alias that ZeRO-3 partitioning and
    weight publishing would each have to special-case.
    """
    spec = {k: v for k, v in locals().items() if k != "path"}
    path = Path(path)
    _write_tiny(path, spec, replace=True)
    return path


def ensure_tiny_model(path: str | os.PathLike, **spec: Any) -> Path:
    """Build the tiny model at `path` unless a model is already there; returns `path`.

    `spec` takes `build_tiny_model`'s keywords. An existing model whose config disagrees with
    `spec` raises ValueError (delete the directory to rebuild): silently training a stale
    architecture is worse than stopping. Safe to call from several processes at once.
    """
    path = Path(path)
    defaults = _default_spec()
    unknown = set(spec) - set(defaults)
    if unknown:
        raise TypeError(f"unknown tiny-model spec keys: {sorted(unknown)}; expected some of {sorted(defaults)}")
    # Non-empty first, config.json second: a racing builder's rename makes the directory appear
    # whole at once, so between the two looks it can only gain its config.json, never hold
    # files without one (the other order once read "no config.json" then "not empty", CI).
    if path.exists() and any(path.iterdir()) and not (path / "config.json").exists():
        raise FileExistsError(f"{path} exists but holds no config.json; remove it or pick another path")
    if (path / "config.json").exists():
        _check_spec(path, spec)
    else:
        _write_tiny(path, {**defaults, **spec}, replace=False)
    return path


def _write_tiny(path: Path, spec: dict[str, Any], *, replace: bool) -> None:
    import torch
    from transformers import Qwen2ForCausalLM

    tokenizer = build_char_tokenizer()
    config = _tiny_config(len(tokenizer), spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = Qwen2ForCausalLM(config).eval()
    if _write_dir_atomically(path, lambda tmp: _save_pretrained(model, tokenizer, tmp), replace=replace):
        logger.info("built tiny model at %s (%d params)", path, sum(p.numel() for p in model.parameters()))


def _default_spec() -> dict[str, Any]:
    params = inspect.signature(build_tiny_model).parameters
    return {name: p.default for name, p in params.items() if p.kind is p.KEYWORD_ONLY}


def _check_spec(path: Path, spec: dict[str, Any]) -> None:
    # config.json itself, not transformers' AutoConfig: importing that costs the launcher ~4 CPU
    # seconds (it pulls in torch) before it starts any actor. A field the file omits (or leaves
    # null) is what the config class derives, which only transformers knows.
    saved, config = json.loads((path / "config.json").read_text()), None
    for key, want in spec.items():
        if key == "seed":
            continue  # not recorded in the config: another seed is the same architecture
        field = _SPEC_TO_CONFIG[key]
        if saved.get(field) is not None:
            have = saved[field]
        else:
            if config is None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(path, local_files_only=True)
            have = getattr(config, field)
        if have != want:
            raise ValueError(
                f"model at {path} has {_SPEC_TO_CONFIG[key]}={have}, but {key}={want} was asked; "
                "delete the directory to rebuild it"
            )


# ---------------------------------------------------------------- load / save


def _require_local_model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise FileNotFoundError(
            f"model path {str(path)!r} {what}: models are loaded from local directories only, "
            "nothing is downloaded (build one with async_pmd.models.ensure_tiny_model or copy a "
            "Hugging Face checkpoint there)"
        )
    return path


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """A causal LM from a local HF directory, in eval mode, on `device`; FileNotFoundError if absent."""
    from transformers import AutoModelForCausalLM

    path = _require_local_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=to_torch_dtype(dtype))
    return model.to(device).eval()


# Tokenizers that are all in their `tokenizer.json` (the tiny model's; any saved as a plain fast
# tokenizer) load as the class that saved them. AutoTokenizer would pick the model type's class
# instead (Qwen2Tokenizer for the tiny qwen2, whose byte-level pipeline drops the char vocab's
# spaces and unknowns), and its import reaches torch through transformers' configuration code.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside the model at `path` (local only); FileNotFoundError if absent."""
    path = _require_local_model_dir(path)
    config_file = path / "tokenizer_config.json"
    name = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if name in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        import transformers

        return getattr(transformers, name).from_pretrained(path, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def save_model(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save `model` (safetensors) and `tokenizer` to `path` in HF format, replacing it atomically."""
    path = Path(path)
    _write_dir_atomically(path, lambda tmp: _save_pretrained(model, tokenizer, tmp), replace=True)
    return path


def _save_pretrained(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory)  # transformers 5 always writes safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
