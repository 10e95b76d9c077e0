"""CLIP's byte-level BPE tokenizer in pure Python, as transformers 5 runs it.

Reads a Stable Diffusion `tokenizer/` folder (`vocab.json`, `merges.txt`,
`tokenizer_config.json`, optionally `special_tokens_map.json`) and gives the
ids a diffusers pipeline feeds its text encoder:
`[<|startoftext|>] + tokens[:max_len - 2] + [<|endoftext|>]`, padded on the
right to `model_max_length` (77) with the pad token of the folder. The pad
token matters: SD 2.x folders pad with "!" (id 0), SD 1.x folders with
`<|endoftext|>`, and the null-prompt embedding depends on it.

transformers 5's `CLIPTokenizer` is a `tokenizers` pipeline; each step here
reproduces one of its stages:

1. special ("added") tokens, i.e. bos / eos / unk / pad, are split out of the
   raw text first (leftmost-longest match, before any normalisation). An
   SD 2.x pad token "!" is one of them, so every "!" of a prompt becomes id 0.
2. each remaining segment is normalised: NFC, every run of whitespace -> " ",
   lower case (character by character, as Rust's `char::to_lowercase`).
3. pre-tokenisation by CLIP's pattern
   `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`
   (a hand-written scanner: `re` has no \\p{..}; letters and numbers are the
   Unicode categories L* and N*, whitespace is `str.isspace` without
   U+001C..U+001F, as in Oniguruma), then the byte-level stage's GPT-2 split,
   which only changes the two special-token pieces ("<|", "endoftext", "|>").
4. UTF-8 bytes -> printable characters (GPT-2's `bytes_to_unicode`), then
   BPE with `</w>` appended to the last character of each piece, merging the
   lowest-ranked pair first (leftmost on ties), as the `tokenizers` BPE model.

Unicode tables are Python's (`unicodedata`), so characters newer than its
Unicode version may classify differently from the Rust library.
"""

from __future__ import annotations

import heapq
import json
import os
import unicodedata
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CLIPTokenizer", "TokenizerError", "bytes_to_unicode"]

# Bounds on the untrusted folder (the released CLIP files: vocab.json 1.6 MB,
# 49,408 entries; merges.txt 0.5 MB, 48,894 merges), each reached in memory
# bounded by a small multiple of the limit.
MAX_FILE_BYTES = 16 << 20
MAX_VOCAB = 1 << 20
MAX_MERGES = 1 << 17
MAX_MERGES_CHARS = 4 << 20
# What parsing one JSON file may allocate: 8 bytes a character and 128 a value or key
# bound CPython's json (~25 MB for the released vocab.json).
MAX_JSON_COST = 64 << 20
MAX_TOKEN_CHARS = 1024
MAX_MODEL_MAX_LENGTH = 8192
MAX_PROMPT_CHARS = 1 << 20

END_OF_WORD = "</w>"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# transformers' CLIPTokenizer defaults for tokens a config leaves out.
_DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_CLIP_SPECIAL_PIECES = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Oniguruma's \s: Python's whitespace without the four information separators.
_NOT_ONIG_SPACE = frozenset("\x1c\x1d\x1e\x1f")

# tokenizer_config.json keys that change nothing when encoding (metadata,
# decoding options, loader bookkeeping transformers writes itself).
_IGNORED_CONFIG_KEYS = frozenset({
    "errors", "name_or_path", "_name_or_path", "special_tokens_map_file", "backend",
    "is_local", "local_files_only", "clean_up_tokenization_spaces", "model_input_names",
    "processor_class", "auto_map", "tokenizer_file",
})  # fmt: skip
# Accepted only at the value that is implemented.
_FIXED_CONFIG_KEYS = {
    "do_lower_case": (True,),
    "add_prefix_space": (False,),
    "padding_side": ("right",),
    "truncation_side": ("right",),
    "tokenizer_class": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "additional_special_tokens": ([],),
    "extra_special_tokens": ([], {}),
}
_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word")


def _short(value: Any) -> str:
    """repr of an untrusted value, cut to keep an error message short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used as it is (one line, naming the file)."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (256 entries)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_BYTE_CHARS = bytes_to_unicode()
_BYTE_TABLE = [_BYTE_CHARS[b] for b in range(256)]


def _is_space(c: str) -> bool:
    return c.isspace() and c not in _NOT_ONIG_SPACE


def _kind(c: str) -> str:
    """'s'pace, 'L'etter, 'N'umber or 'P' (anything else) as CLIP's pattern sees c."""
    if _is_space(c):
        return "s"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lower case per character."""
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    in_space = False
    for c in text:
        if _is_space(c):
            if not in_space:
                out.append(" ")
            in_space = True
            continue
        in_space = False
        out.append(c.lower())
    return "".join(out)


def pre_tokenize(text: str) -> Iterator[str]:
    """CLIP's pre-tokenisation pattern (then the byte-level GPT-2 split) over normalised text."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "<":
            special = next((s for s in _CLIP_SPECIAL_PIECES if text.startswith(s, i)), None)
            if special is not None:
                # One CLIP piece; the byte-level stage's GPT-2 pattern splits it in three.
                yield "<|"
                yield special[2:-2]
                yield "|>"
                i += len(special)
                continue
        if c == "'":
            contraction = next((s for s in _CONTRACTIONS if text.startswith(s, i)), None)
            if contraction is not None:
                yield contraction
                i += len(contraction)
                continue
        kind = _kind(c)
        if kind == "s":
            i += 1
        elif kind == "N":
            yield c
            i += 1
        else:  # a run of letters, or a run of anything neither space, letter nor number
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            yield text[i:j]
            i = j


def _read(folder: Path, name: str, *, required: bool = True) -> str | None:
    import stat

    path = folder / name
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.lexists(path):
            raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
        if required:
            raise TokenizerError(f"{path}: missing") from None
        return None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block: refused before it is opened
        raise TokenizerError(f"{path}: is not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} allowed")
    try:
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise TokenizerError(f"{path}: is not a regular file")
            pieces, size = [], 0
            while size <= MAX_FILE_BYTES:  # in pieces: read(limit) would reserve the whole limit at once
                piece = f.read(1 << 20)
                if not piece:
                    break
                pieces.append(piece)
                size += len(piece)
            raw = b"".join(pieces)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: more than the {MAX_FILE_BYTES} bytes allowed")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _read_json(folder: Path, name: str, *, required: bool = True) -> Any:
    text = _read(folder, name, required=required)
    if text is None:
        return None
    # Each value but the first and each key follows one of ,:[{ (an upper bound on their number).
    values = sum(map(text.count, ",:[{")) + 1
    cost = 8 * len(text) + 128 * values
    if cost > MAX_JSON_COST:
        raise TokenizerError(
            f"{folder / name}: up to {values:,} JSON values in {len(text):,} characters, more than "
            f"a tokenizer file holds (parsing would take {cost:,} bytes, limit {MAX_JSON_COST:,})"
        )
    try:
        return json.loads(text, parse_int=_small_int)
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{folder / name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise TokenizerError(f"{folder / name}: JSON nested too deeply") from None
    except ValueError as e:  # _small_int, or anything else json refuses
        raise TokenizerError(f"{folder / name}: not valid JSON ({str(e)[:200]})") from None


def _small_int(text: str) -> int:
    """json's int parser, refusing what cannot be a token id or a setting before int() works on it."""
    if len(text) > 40:
        raise ValueError(f"an integer of {len(text):,} digits, not a token id or setting")
    return int(text)


def _token_content(where: str, key: str, value: Any) -> tuple[str, bool]:
    """A special-token entry (string or AddedToken dict) -> (content, normalized flag).

    A plain string, or an object without `normalized`, is matched on the raw
    text (what transformers 5 does with a named special token).
    """
    if isinstance(value, str):
        content, normalized = value, False
    elif isinstance(value, Mapping):
        content = value.get("content")
        if not isinstance(content, str):
            raise TokenizerError(f"{where}: {key} has no string 'content'")
        for flag in _TOKEN_FLAGS:
            if value.get(flag, False) is not False:
                raise TokenizerError(f"{where}: {key} sets {flag}, which is not supported")
        unknown = set(value) - {"content", "normalized", "special", "__type", *_TOKEN_FLAGS}
        if unknown:
            raise TokenizerError(f"{where}: {key} has unknown fields {', '.join(sorted(unknown))}")
        normalized = value.get("normalized", False)
        if not isinstance(normalized, bool) or not isinstance(value.get("special", True), bool):
            raise TokenizerError(f"{where}: {key}.normalized and .special must be true or false")
    else:
        raise TokenizerError(f"{where}: {key} must be a string or a token object")
    if not 0 < len(content) <= MAX_TOKEN_CHARS:
        raise TokenizerError(f"{where}: {key} must be 1..{MAX_TOKEN_CHARS} characters")
    return content, normalized


def _parse_vocab(where: str, data: Any) -> dict[str, int]:
    if not isinstance(data, dict):
        raise TokenizerError(f"{where}: must be a JSON object token -> id")
    if not 0 < len(data) <= MAX_VOCAB:
        raise TokenizerError(f"{where}: {len(data)} entries, expected 1..{MAX_VOCAB}")
    seen: dict[int, str] = {}
    for token, idx in data.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < MAX_VOCAB:
            raise TokenizerError(
                f"{where}: id of {_short(token)} must be an integer in 0..{MAX_VOCAB - 1}"
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise TokenizerError(f"{where}: a token is longer than {MAX_TOKEN_CHARS} characters")
        if idx in seen:
            raise TokenizerError(
                f"{where}: id {idx} is given to both {seen[idx]!r} and {_short(token)}"
            )
        seen[idx] = token
    return data


def _parse_merges(where: str, text: str, vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    # Bounded before splitting: each short line costs some 400 bytes of lists, strings and tuples.
    if len(text) > MAX_MERGES_CHARS:
        raise TokenizerError(
            f"{where}: {len(text):,} characters, more than the {MAX_MERGES_CHARS:,} a merges file may hold"
        )
    count = text.count("\n")
    if count > MAX_MERGES + 1:
        raise TokenizerError(
            f"{where}: {count:,} lines, more than the {MAX_MERGES:,} merges allowed"
        )
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{where}: line {number} is not two tokens separated by one space")
        a, b = parts
        for token in (a, b, a + b):
            if token not in vocab:
                raise TokenizerError(
                    f"{where}: line {number}: {_short(token)} is not in vocab.json"
                )
        merges.append((a, b))
    return merges


def _check_config(where: str, config: Any) -> None:
    if not isinstance(config, dict):
        raise TokenizerError(f"{where}: must be a JSON object")
    known = {*_IGNORED_CONFIG_KEYS, *_FIXED_CONFIG_KEYS, *_SPECIAL_NAMES}
    unknown = sorted(set(config) - known - {"model_max_length", "added_tokens_decoder"})
    if unknown:
        raise TokenizerError(f"{where}: unsupported option(s): {', '.join(unknown)}")
    for key, allowed in _FIXED_CONFIG_KEYS.items():
        if key in config and not any(
            config[key] == v and type(config[key]) is type(v) for v in allowed
        ):
            raise TokenizerError(
                f"{where}: {key} = {_short(config[key])} is not supported "
                f"(supported: {', '.join(map(repr, allowed))})"
            )


class _Matcher:
    """Leftmost-longest matching of a fixed set of strings (the `tokenizers` added-token trie)."""

    def __init__(self, tokens: Mapping[str, int]) -> None:
        self.tokens = dict(tokens)
        self._by_first: dict[str, list[str]] = {}
        for token in sorted(self.tokens, key=len, reverse=True):
            if token:
                self._by_first.setdefault(token[0], []).append(token)

    def split(self, text: str) -> Iterator[tuple[int | None, str]]:
        """(id, token) for each match and (None, text) for the text between matches."""
        if not self._by_first:
            if text:
                yield None, text
            return
        start = i = 0
        n = len(text)
        while i < n:
            candidates = self._by_first.get(text[i])
            match = None
            if candidates:
                match = next((t for t in candidates if text.startswith(t, i)), None)
            if match is None:
                i += 1
                continue
            if start < i:
                yield None, text[start:i]
            yield self.tokens[match], match
            i += len(match)
            start = i
        if start < n:
            yield None, text[start:]


class CLIPTokenizer:
    """CLIP tokenizer: `tok(prompts) -> (B, model_max_length) int32` ids.

    Build it with `from_folder(path)` (a Stable Diffusion `tokenizer/`
    folder), or directly from a vocabulary, merges and special tokens.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        model_max_length: int = 77,
        added_tokens: Sequence[str] = (),
        normalized_tokens: Collection[str] = (),
    ) -> None:
        """`added_tokens`: more special tokens (already in `vocab`), split out of
        prompts like bos/eos/unk/pad. Special tokens listed in
        `normalized_tokens` are matched on the normalised text, the others on
        the raw text (transformers' `AddedToken.normalized`)."""
        self.vocab = dict(vocab)
        specials = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token,
                    "pad_token": pad_token}  # fmt: skip
        for key, token in specials.items():
            if not isinstance(token, str) or token not in self.vocab:
                raise TokenizerError(f"{key} {_short(token)} is not in the vocabulary")
        if (
            isinstance(model_max_length, bool)
            or not isinstance(model_max_length, int)
            or not 2 <= model_max_length <= MAX_MODEL_MAX_LENGTH
        ):
            raise TokenizerError(
                f"model_max_length must be an integer in 2..{MAX_MODEL_MAX_LENGTH}, "
                f"got {_short(model_max_length)}"
            )
        for token in added_tokens:
            if not isinstance(token, str) or not token or token not in self.vocab:
                raise TokenizerError(f"added token {_short(token)} is not in the vocabulary")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = self.vocab[bos_token]
        self.eos_token_id = self.vocab[eos_token]
        self.unk_token_id = self.vocab[unk_token]
        self.pad_token_id = self.vocab[pad_token]
        self.model_max_length = model_max_length
        # Later duplicates win, as in the `tokenizers` merge map.
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special_tokens = tuple(sorted({*specials.values(), *added_tokens}))
        unknown = set(normalized_tokens) - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"normalized_tokens {sorted(unknown)} are not special tokens")
        # Raw tokens are matched as written; normalised ones by their normalised content.
        self._raw = _Matcher({t: self.vocab[t] for t in self.special_tokens
                              if t not in normalized_tokens})  # fmt: skip
        self._normalized = _Matcher({normalize(t): self.vocab[t] for t in normalized_tokens})
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, path: str | os.PathLike[str]) -> CLIPTokenizer:
        """Load a transformers CLIP tokenizer folder, validating every file.

        Special tokens follow transformers' precedence: `special_tokens_map.json`
        overrides `tokenizer_config.json`, unless the config carries an
        `added_tokens_decoder` (transformers then does not read the map).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a directory")
        if (folder / "tokenizer.json").exists():
            raise TokenizerError(
                f"{folder / 'tokenizer.json'}: a serialized `tokenizers` pipeline takes precedence "
                "in transformers and is not read here; use a folder with vocab.json + merges.txt only"
            )
        config_where = str(folder / "tokenizer_config.json")
        config = _read_json(folder, "tokenizer_config.json")
        _check_config(config_where, config)
        vocab = _parse_vocab(str(folder / "vocab.json"), _read_json(folder, "vocab.json"))
        merges = _parse_merges(str(folder / "merges.txt"), _read(folder, "merges.txt"), vocab)

        # transformers registers the named tokens in this order after the
        # added_tokens_decoder entries; a later registration of the same
        # content replaces the earlier one (its `normalized` flag included).
        flags: dict[str, bool] = {}
        named: dict[str, tuple[str, Any]] = {}  # key -> (file, value)
        for key in _SPECIAL_NAMES:
            if config.get(key) is not None:
                _token_content(config_where, key, config[key])  # checked even if overridden
                named[key] = (config_where, config[key])
        added: list[str] = []
        decoder_tokens: dict[str, bool] = {}
        if "added_tokens_decoder" in config:
            decoder_tokens = _added_tokens(config_where, config["added_tokens_decoder"], vocab)
            added = list(decoder_tokens)
            flags.update(decoder_tokens)
        else:
            map_where = str(folder / "special_tokens_map.json")
            special_map = _read_json(folder, "special_tokens_map.json", required=False)
            if special_map is not None:
                if not isinstance(special_map, dict):
                    raise TokenizerError(f"{map_where}: must be a JSON object")
                extra = special_map.get("additional_special_tokens", [])
                unknown = sorted(set(special_map) - {*_SPECIAL_NAMES, "additional_special_tokens"})
                if unknown or extra != []:
                    what = ", ".join(unknown) or "additional_special_tokens"
                    raise TokenizerError(f"{map_where}: unsupported entries: {what}")
                for key in _SPECIAL_NAMES:
                    if special_map.get(key) is not None:
                        named[key] = (map_where, special_map[key])
        resolved = dict(_DEFAULT_SPECIALS)
        for key in _SPECIAL_NAMES:  # bos, eos, unk, pad: transformers' order
            if key in named:
                where, value = named[key]
                content, normalized = _token_content(where, key, value)
                if content not in vocab:
                    raise TokenizerError(f"{where}: {key} {content!r} is not in vocab.json")
            else:
                content, normalized = resolved[key], False
            # A named token that the decoder lists is the decoder's token object.
            flags[content] = decoder_tokens.get(content, normalized)
            resolved[key] = content
        if "model_max_length" not in config:
            raise TokenizerError(f"{config_where}: model_max_length is missing")
        max_len = config["model_max_length"]
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise TokenizerError(f"{config_where}: model_max_length must be an integer")
        try:
            return cls(vocab, merges, **resolved, model_max_length=max_len, added_tokens=added,
                       normalized_tokens=[t for t, n in flags.items() if n])  # fmt: skip
        except TokenizerError as e:
            raise TokenizerError(f"{folder}: {e}") from None

    # -- encoding ---------------------------------------------------------

    def _bpe(self, piece: str) -> list[int]:
        """BPE of one pre-token (already byte-mapped), as `tokenizers`' `Word::merge_all`."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        vocab, unk = self.vocab, self.unk_token
        symbols = [c if c in vocab else unk for c in piece[:-1]]
        last = piece[-1] + END_OF_WORD
        symbols.append(last if last in vocab else unk)
        n = len(symbols)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        ranks = self._ranks
        heap = []
        for i in range(n - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None:
                heap.append((rank, i, symbols[i] + symbols[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, pos, merged = heapq.heappop(heap)
            if not alive[pos] or nxt[pos] >= n:
                continue
            right = nxt[pos]
            if (
                symbols[pos] + symbols[right] != merged
                or (symbols[pos], symbols[right]) not in ranks
            ):
                continue  # an expired entry
            symbols[pos] = merged
            alive[right] = False
            nxt[pos] = nxt[right]
            if nxt[right] < n:
                prv[nxt[right]] = pos
            if prv[pos] >= 0:
                p = prv[pos]
                rank = ranks.get((symbols[p], merged))
                if rank is not None:
                    heapq.heappush(heap, (rank, p, symbols[p] + merged))
            if nxt[pos] < n:
                q = nxt[pos]
                rank = ranks.get((merged, symbols[q]))
                if rank is not None:
                    heapq.heappush(heap, (rank, pos, merged + symbols[q]))
        ids = [vocab[s] for s, a in zip(symbols, alive, strict=True) if a]
        if len(self._cache) < 65536:
            self._cache[piece] = ids
        return ids

    def tokenize_ids(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text` without bos/eos or padding (the first `limit` if given)."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
        if len(text) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt of {len(text)} characters (at most {MAX_PROMPT_CHARS})")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"prompt is not valid Unicode ({e.reason} at {e.start})") from None
        ids: list[int] = []
        for raw_id, segment in self._raw.split(text):
            if raw_id is not None:
                ids.append(raw_id)
            else:
                for norm_id, normalized in self._normalized.split(normalize(segment)):
                    if norm_id is not None:
                        ids.append(norm_id)
                        continue
                    for piece in pre_tokenize(normalized):
                        mapped = "".join(_BYTE_TABLE[b] for b in piece.encode("utf-8"))
                        ids.extend(self._bpe(mapped))
                        if limit is not None and len(ids) >= limit:
                            break
                    if limit is not None and len(ids) >= limit:
                        break
            if limit is not None and len(ids) >= limit:
                break
        return ids if limit is None else ids[:limit]

    def encode(self, text: str) -> list[int]:
        """[bos] + ids (truncated to model_max_length - 2) + [eos], unpadded."""
        body = self.tokenize_ids(text, self.model_max_length - 2)
        return [self.bos_token_id, *body, self.eos_token_id]

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(B, model_max_length) int32: encoded prompts, right-padded with the pad token."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = np.full((len(prompts), self.model_max_length), self.pad_token_id, np.int32)
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            out[row, : len(ids)] = ids
        return out


def _added_tokens(where: str, decoder: Any, vocab: Mapping[str, int]) -> dict[str, bool]:
    """`added_tokens_decoder` (id -> token object) -> {content: normalized}.

    Only special tokens already in the vocabulary at the same id are supported.
    """
    if not isinstance(decoder, dict) or len(decoder) > 1024:
        raise TokenizerError(
            f"{where}: added_tokens_decoder must be an object of at most 1024 tokens"
        )
    out: dict[str, bool] = {}
    for idx, value in decoder.items():
        key = f"added_tokens_decoder[{idx}]"
        content, normalized = _token_content(where, key, value)
        if not isinstance(value, Mapping) or value.get("special") is not True:
            raise TokenizerError(f"{where}: {key} is not a special token (not supported)")
        if not (idx.isdigit() and vocab.get(content) == int(idx)):
            raise TokenizerError(f"{where}: {key} {content!r} does not match vocab.json")
        out[content] = normalized
    return out
