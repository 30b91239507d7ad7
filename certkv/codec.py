"""Text to token ids for a local checkpoint: its own tokenizer, or bytes for the repo's byte-level model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from certkv import errors

BYTE_VOCAB = 258  # the repo's tiny model: 256 bytes, BOS = 256, EOS = 257 (certkv.tinylm.data)


class TextCodec:
    """``encode(text, bos)`` and ``decode(ids)`` for the model at ``path``; ``unit`` names what one id
    is ("byte" or "token"), so bits per id can be reported as bits per byte where that is what they are."""

    def __init__(self, model: Any, path: str | Path) -> None:
        try:
            from transformers import AutoTokenizer

            self._tok: Any = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            if getattr(model.config, "vocab_size", None) != BYTE_VOCAB:
                raise errors.ConfigError(f"{path}: no tokenizer found and the model is not byte-level") from None
            self._tok = None
        self.unit = "byte" if self._tok is None else "token"

    def encode(self, text: str, bos: bool = False) -> list[int]:
        if self._tok is None:
            return ([256] if bos else []) + list(text.encode("utf-8"))
        ids = list(self._tok(text, add_special_tokens=False)["input_ids"])
        first = self._tok.bos_token_id
        return ([first] if bos and first is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        if self._tok is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return str(self._tok.decode(ids, skip_special_tokens=True))
