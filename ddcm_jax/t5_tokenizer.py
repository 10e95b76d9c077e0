"""The T5 tokenizer (FLUX's `tokenizer_2`) through the `tokenizers` library, as transformers 5 runs it.

transformers 5's `T5Tokenizer` (= `T5TokenizerFast`, what diffusers' FLUX
pipeline loads) does NOT run a folder's `tokenizer.json` pipeline as stored:
it takes the Unigram vocabulary (pieces and scores) and the SentencePiece
`Precompiled` normalizer's character map out of the file and rebuilds the rest
itself (when loaded with `from_pretrained`, as diffusers does; constructed directly as
`T5TokenizerFast(tokenizer_file=...)` it runs the file as stored, a different
function for a file whose normaliser is not just `Precompiled`). This module
rebuilds the same `tokenizers.Tokenizer` as `from_pretrained`:

1. model `Unigram(vocab, unk_id=2, byte_fallback=False)` (transformers fixes
   both; a file whose `<unk>` is not id 2 is refused rather than mis-read);
2. normalizer: the file's first `Precompiled` map (the released T5 files' NFKC
   table), or none; any other normaliser of the file is dropped, as there;
3. pre-tokenizer `WhitespaceSplit` then `Metaspace("▁", prepend_scheme="always",
   split=True)`: runs of whitespace collapse, each word gets a leading `▁`;
4. special tokens are split out of the raw text first (the file's
   `added_tokens`, then the config's pad / eos / unk, `<extra_id_i>` sentinels
   and extra special tokens), so "</s>" or "<extra_id_0>" inside a prompt is one id;
5. post-processor: append `</s>`;
6. what FLUX asks for (`padding="max_length", truncation=True,
   max_length=512`): truncate the pieces to `model_max_length - 1` on the right,
   append `</s>` (so a long prompt still ends in `</s>`), right-pad with `<pad>`.

A BPE `tokenizer.json` is refused: transformers' T5Tokenizer cannot build one
either (its backend is a Unigram model). The folder's own `truncation` /
`padding` / `post_processor` entries are replaced by the settings above, as in
transformers when called with explicit arguments.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["T5Tokenizer", "T5TokenizerError"]

# Bounds on the untrusted folder (the released T5 v1.1 tokenizer.json: 2.4 MB, 32,100 pieces).
MAX_FILE_BYTES = 32 << 20
MAX_PIECES = 1 << 20
MAX_PIECE_CHARS = 1024
MAX_SPECIAL_TOKENS = 4096
MAX_MODEL_MAX_LENGTH = 1 << 14
MAX_PROMPT_CHARS = 1 << 20
# transformers' T5Tokenizer: model_max_length when a config gives none is unbounded there; FLUX
# passes max_length=512 explicitly, T5's length, so that is the default here.
DEFAULT_MAX_LENGTH = 512
UNK_ID = 2
METASPACE = "\u2581"

_DEFAULT_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
_TOKENIZER_CLASSES = ("T5Tokenizer", "T5TokenizerFast")
# tokenizer_config.json keys without effect on encoding (metadata, decoding and loader
# bookkeeping; `legacy` only concerns the slow SentencePiece tokenizer; `sp_model_kwargs`
# sampling options of the slow one).
_IGNORED_CONFIG_KEYS = frozenset({
    "backend", "legacy", "clean_up_tokenization_spaces", "name_or_path", "_name_or_path",
    "special_tokens_map_file", "tokenizer_file", "vocab_file", "model_input_names",
    "processor_class", "auto_map", "is_local", "local_files_only", "sp_model_kwargs",
    "add_prefix_space", "add_bos_token", "add_eos_token", "split_special_tokens",
})  # fmt: skip
# Accepted only at these values (anything else changes the ids).
_NEUTRAL_CONFIG = {"padding_side": "right", "truncation_side": "right"}


class T5TokenizerError(ValueError):
    """A tokenizer folder or file that cannot be read as a T5 tokenizer (one line, naming it)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _read(path: Path) -> bytes:
    """The bytes of one regular file, at most MAX_FILE_BYTES, read without trusting its size."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.lexists(path):
            raise T5TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
        raise T5TokenizerError(f"{path}: missing") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block: refused before it is opened
        raise T5TokenizerError(f"{path}: is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise T5TokenizerError(
            f"{path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} allowed"
        )
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat
    except OSError as e:
        raise T5TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise T5TokenizerError(f"{path}: more than the {MAX_FILE_BYTES} bytes allowed")
    return raw


def _small_int(text: str) -> int:
    if len(text) > 40:
        raise ValueError(f"an integer of {len(text):,} digits")
    return int(text)


def _parse_json(raw: bytes, where: str) -> Any:
    if len(raw) > MAX_FILE_BYTES:
        raise T5TokenizerError(f"{where}: {len(raw)} bytes, more than the {MAX_FILE_BYTES} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise T5TokenizerError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_int=_small_int)
    except json.JSONDecodeError as e:
        raise T5TokenizerError(
            f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise T5TokenizerError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:
        raise T5TokenizerError(f"{where}: not valid JSON ({str(e)[:200]})") from None


def _vocab(where: str, model: Any) -> list[tuple[str, float]]:
    """The Unigram model's (piece, score) list, checked."""
    if not isinstance(model, Mapping) or model.get("type") != "Unigram":
        kind = model.get("type") if isinstance(model, Mapping) else None
        raise T5TokenizerError(
            f"{where}: model type {_short(kind)} is not a T5 (Unigram) tokenizer"
            + (
                " (transformers' T5Tokenizer cannot build a BPE one either)"
                if kind == "BPE"
                else ""
            )
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, list) or not UNK_ID < len(vocab) <= MAX_PIECES:
        raise T5TokenizerError(
            f"{where}: model.vocab must be a list of {UNK_ID + 1}..{MAX_PIECES} [piece, score] pairs"
        )
    pieces: list[tuple[str, float]] = []
    for i, entry in enumerate(vocab):
        ok = (
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and 0 < len(entry[0]) <= MAX_PIECE_CHARS
            and isinstance(entry[1], int | float) and not isinstance(entry[1], bool)
            and np.isfinite(entry[1])
        )  # fmt: skip
        if not ok:
            raise T5TokenizerError(f"{where}: model.vocab[{i}] is not a [piece, score] pair")
        pieces.append((entry[0], float(entry[1])))
    unk = model.get("unk_id", UNK_ID)
    if unk != UNK_ID:  # transformers builds Unigram(unk_id=2) whatever the file says
        raise T5TokenizerError(f"{where}: model.unk_id {_short(unk)} is not T5's {UNK_ID}")
    return pieces


def _precompiled_map(where: str, normalizer: Any) -> bytes | None:
    """The first `Precompiled` normaliser's charsmap (transformers keeps only that one)."""
    if normalizer is None:
        return None
    if not isinstance(normalizer, Mapping):
        raise T5TokenizerError(f"{where}: normalizer must be an object or null")
    items = normalizer.get("normalizers") if normalizer.get("type") == "Sequence" else [normalizer]
    if not isinstance(items, list):
        raise T5TokenizerError(f"{where}: normalizer Sequence without a normalizers list")
    for item in items:
        if isinstance(item, Mapping) and item.get("type") == "Precompiled":
            charsmap = item.get("precompiled_charsmap")
            if not isinstance(charsmap, str):
                raise T5TokenizerError(f"{where}: Precompiled normalizer without a charsmap")
            try:
                return base64.b64decode(charsmap, validate=True)
            except (binascii.Error, ValueError):
                raise T5TokenizerError(f"{where}: Precompiled charsmap is not base64") from None
    return None


def _content(where: str, key: str, value: Any) -> str:
    """A special token given as a string or an AddedToken object -> its text."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PIECE_CHARS:
        raise T5TokenizerError(
            f"{where}: {key} must be a non-empty token string, got {_short(value)}"
        )
    return value


def _file_added_tokens(where: str, entries: Any) -> list[dict[str, Any]]:
    if entries is None:
        return []
    if not isinstance(entries, list) or len(entries) > MAX_SPECIAL_TOKENS:
        raise T5TokenizerError(
            f"{where}: added_tokens must be a list of at most {MAX_SPECIAL_TOKENS} tokens"
        )
    flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
    out = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, Mapping) and isinstance(entry.get("id"), int)
                and all(isinstance(entry.get(f, False), bool) for f in flags)):  # fmt: skip
            raise T5TokenizerError(f"{where}: added_tokens[{i}] is not a token object")
        content = _content(where, f"added_tokens[{i}]", entry)
        out.append({"content": content, "id": entry["id"],
                    **{f: entry.get(f, f == "normalized") for f in flags}})  # fmt: skip
    return out


def _config_specials(
    where: str, config: Mapping[str, Any]
) -> tuple[dict[str, str], list[str], int]:
    """(pad / eos / unk contents, extra special tokens, model_max_length) of tokenizer_config.json."""
    read = {"model_max_length", "extra_ids", "additional_special_tokens", "extra_special_tokens",
            "added_tokens_decoder", "tokenizer_class", *_DEFAULT_SPECIALS}  # fmt: skip
    unknown = sorted(str(k) for k in config if k not in read | _IGNORED_CONFIG_KEYS
                     and k not in _NEUTRAL_CONFIG)  # fmt: skip
    if unknown:
        raise T5TokenizerError(f"{where}: unsupported option(s): {', '.join(unknown)}")
    for key, value in _NEUTRAL_CONFIG.items():
        if key in config and config[key] != value:
            raise T5TokenizerError(
                f"{where}: {key} {_short(config[key])} is not supported ({value!r} only)"
            )
    cls = config.get("tokenizer_class", _TOKENIZER_CLASSES[0])
    if cls not in _TOKENIZER_CLASSES:
        raise T5TokenizerError(f"{where}: tokenizer_class {_short(cls)} is not a T5 tokenizer")
    specials = {k: _content(where, k, config.get(k, d)) for k, d in _DEFAULT_SPECIALS.items()}
    extra_ids = config.get("extra_ids", 100)  # transformers' T5Tokenizer default
    if (
        isinstance(extra_ids, bool)
        or not isinstance(extra_ids, int)
        or not 0 <= extra_ids <= MAX_SPECIAL_TOKENS
    ):
        raise T5TokenizerError(
            f"{where}: extra_ids must be in 0..{MAX_SPECIAL_TOKENS}, got {_short(extra_ids)}"
        )
    extras = [f"<extra_id_{i}>" for i in range(extra_ids)]
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        if not isinstance(value, list) or len(value) > MAX_SPECIAL_TOKENS:
            raise T5TokenizerError(
                f"{where}: {key} must be a list of at most {MAX_SPECIAL_TOKENS} tokens"
            )
        extras += [_content(where, f"{key}[{i}]", v) for i, v in enumerate(value)]
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping) or len(decoder) > MAX_SPECIAL_TOKENS:
        raise T5TokenizerError(f"{where}: added_tokens_decoder must be an object of at most "
                               f"{MAX_SPECIAL_TOKENS} tokens")  # fmt: skip
    # Only the text of these is used: they become plain special tokens (no lstrip / rstrip),
    # which is what the T5 files written by transformers hold.
    extras += [_content(where, f"added_tokens_decoder[{k}]", v) for k, v in decoder.items()]
    length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if (
        isinstance(length, bool)
        or not isinstance(length, int)
        or not 2 <= length <= MAX_MODEL_MAX_LENGTH
    ):
        raise T5TokenizerError(
            f"{where}: model_max_length must be in 2..{MAX_MODEL_MAX_LENGTH}, got {_short(length)}"
        )
    return specials, list(dict.fromkeys(extras)), length


class T5Tokenizer:
    """transformers 5's T5Tokenizer (FLUX `tokenizer_2`) on the `tokenizers` library.

    `tok(prompts)` -> (B, model_max_length) int64: `pieces[:max - 1] + [</s>]`,
    right-padded with `pad_id`.
    """

    def __init__(self, backend: Any, model_max_length: int, pad_id: int, eos_id: int) -> None:
        self._backend = backend
        self.model_max_length = model_max_length
        self.pad_id = pad_id
        self.eos_id = eos_id

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> T5Tokenizer:
        """Read `tokenizer.json` (required) and `tokenizer_config.json` (optional) of a folder."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = _read(config_path) if os.path.lexists(config_path) else None
        return cls.from_bytes(_read(folder / "tokenizer.json"), config, str(folder))

    @classmethod
    def from_bytes(
        cls, tokenizer_json: bytes, config_json: bytes | None, where: str
    ) -> T5Tokenizer:
        """Build from the two files' bytes; `where` names them in errors (`where/tokenizer.json`)."""
        from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import Unigram

        tok_where, cfg_where = f"{where}/tokenizer.json", f"{where}/tokenizer_config.json"
        data = _parse_json(tokenizer_json, tok_where)
        if not isinstance(data, Mapping) or "model" not in data:
            raise T5TokenizerError(f"{tok_where}: not a tokenizers file (no model)")
        vocab = _vocab(tok_where, data["model"])
        charsmap = _precompiled_map(tok_where, data.get("normalizer"))
        added = _file_added_tokens(tok_where, data.get("added_tokens"))
        config = {} if config_json is None else _parse_json(config_json, cfg_where)
        if not isinstance(config, Mapping):
            raise T5TokenizerError(f"{cfg_where}: must be a JSON object")
        specials, extras, length = _config_specials(cfg_where, config)
        try:
            backend = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
            if charsmap is not None:
                backend.normalizer = normalizers.Precompiled(charsmap)
        except Exception as e:  # the Rust library's own checks (duplicate pieces, a bad charsmap)
            raise T5TokenizerError(f"{tok_where}: refused by tokenizers ({str(e)[:200]})") from None
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
        ])  # fmt: skip
        # The file's added tokens with their flags, then the config's special tokens (special,
        # matched on the raw text), in transformers' order.
        for entry in sorted(added, key=lambda e: e["id"]):
            token = AddedToken(entry["content"], single_word=entry["single_word"],
                               lstrip=entry["lstrip"], rstrip=entry["rstrip"],
                               normalized=entry["normalized"], special=entry["special"])  # fmt: skip
            backend.add_tokens([token])
            if backend.token_to_id(entry["content"]) != entry["id"]:
                raise T5TokenizerError(
                    f"{tok_where}: added token {entry['content']!r} has id {entry['id']}, "
                    "not its id in the vocabulary"
                )
        named = [specials["pad_token"], specials["eos_token"], specials["unk_token"]]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(named + extras)])  # fmt: skip
        if backend.token_to_id(specials["unk_token"]) != UNK_ID:
            raise T5TokenizerError(
                f"{cfg_where}: unk_token {specials['unk_token']!r} is not id {UNK_ID} of the vocabulary"
            )
        eos_id = backend.token_to_id(specials["eos_token"])
        pad_id = backend.token_to_id(specials["pad_token"])
        eos = specials["eos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, eos_id)]
        )
        # Truncation counts the appended </s>: pieces are cut to length - 1, then </s> added.
        backend.enable_truncation(max_length=length, strategy="longest_first", direction="right")
        backend.enable_padding(direction="right", pad_id=pad_id, pad_token=specials["pad_token"],
                               length=length)  # fmt: skip
        return cls(backend, length, pad_id, eos_id)

    def _encodings(self, prompts: str | Sequence[str]) -> list[Any]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"a prompt of {len(p):,} characters (limit {MAX_PROMPT_CHARS:,})")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a prompt is not valid Unicode (lone surrogate)") from None
        return self._backend.encode_batch(prompts)

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(B, model_max_length) int64 ids; a single string gives B = 1."""
        encodings = self._encodings(prompts)
        out = np.full((len(encodings), self.model_max_length), self.pad_id, np.int64)
        for row, enc in enumerate(encodings):
            out[row] = enc.ids
        return out

    def pieces(self, prompt: str) -> list[str]:
        """The prompt's pieces as the model sees them, `</s>` included, padding left out."""
        enc = self._encodings([prompt])[0]
        return [t for t, m in zip(enc.tokens, enc.attention_mask, strict=True) if m]
