"""Tokenizers, apart from any model weights: a GGUF file's vocabulary through llama.cpp, or a
Hugging Face `tokenizer.json` through the `tokenizers` library.

Both tokenize rendered template text the same way: special tokens written as text are parsed as
tokens (`special=False` for plain text such as an answer being scored), and BOS is added only if
the vocabulary wants it and the text does not already start with it (chat templates usually
write `{{ bos_token }}` themselves). The llama.cpp and MLX backends tokenize through these, and
so does the server backend, whose servers do not all expose their tokenizer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

from .backends.base import BackendError
from .llama_lib import llama_cpp


class GGUFVocab:
    """The vocabulary of a loaded llama.cpp model (`llama_model *`)."""

    def __init__(self, lc, model):
        self._lc, self._vocab = lc, lc.llama_model_get_vocab(model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.bos_id = lc.llama_vocab_bos(self._vocab)
        self.bos_text = self.token_text(self.bos_id)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (self._lc.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        if add_bos is None:
            add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lc.llama_token * n_max)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:  # buffer too small (cannot happen for byte-level vocabularies, but be safe)
            n_max = -n
            buf = (self._lc.llama_token * n_max)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise BackendError("tokenization failed")
        return list(buf[:n])

    def piece_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for in generated text (control tokens: none, unless `special`)."""
        piece = ctypes.create_string_buffer(256)  # one per call: generation's lanes call this side by side
        n = self._lc.llama_token_to_piece(self._vocab, token, piece, len(piece), 0, special)
        if n < 0:
            raise BackendError(f"token {token} does not fit the piece buffer")
        return piece.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of `tokens`; control tokens written out only with `special` (to tokenize again)."""
        return b"".join(self.piece_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_control(self._vocab, token))

    def control_ids(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self.is_control(t) or self.is_eog(t)]

    def strips(self, token: int) -> tuple[bool, bool]:
        """(lstrip, rstrip): whether llama.cpp swallows the whitespace before / after this special
        token where it stands in text (set per model family, e.g. for Phi-3's chat tokens)."""
        attr = self._lc.llama_vocab_get_attr(self._vocab, token)
        return bool(attr & self._lc.LLAMA_TOKEN_ATTR_LSTRIP), bool(attr & self._lc.LLAMA_TOKEN_ATTR_RSTRIP)

    def eog_ids(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self.is_eog(t)]


class GGUFVocabFile(GGUFVocab):
    """A GGUF file's vocabulary alone: llama.cpp loads it without the weights (vocab_only)."""

    def __init__(self, path: str | Path):
        lc = llama_cpp()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        self._model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise BackendError(f"llama.cpp could not read the vocabulary of {path}")
        super().__init__(lc, self._model)

    def close(self) -> None:
        if self._model:
            self._lc.llama_model_free(self._model)
            self._model = None


class HFVocab:
    """A Hugging Face `tokenizer.json`, with BOS given by name (from tokenizer_config.json)."""

    def __init__(self, path: str | Path, bos_token: str | None):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise BackendError("a Hugging Face tokenizer needs the `tokenizers` package "
                               "(pip install tokenizers)") from None
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions for a malformed file
            raise BackendError(f"cannot read the tokenizer {path}: {e}") from None
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_text = bos_token or ""
        self.bos_id = self._tok.token_to_id(bos_token) if bos_token else None
        probe = self._tok.encode("a", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self._special = sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def tokenize(self, text: str, *, add_bos: bool | None = None, special: bool = True) -> list[int]:
        if add_bos is None:
            add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        self._tok.encode_special_tokens = not special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        return [self.bos_id, *ids] if add_bos else ids

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def detokenize(self, tokens: Sequence[int], special: bool = True) -> str:
        return self._tok.decode(list(tokens), skip_special_tokens=not special)

    def control_ids(self) -> list[int]:
        return list(self._special)

    def close(self) -> None:
        pass
