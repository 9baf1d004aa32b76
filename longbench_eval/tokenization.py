"""The tokenizer LongBench and the original QJL driver use: the *slow* (sentencepiece) one.

LongBench's pred.py and QJL's run_longbench.py load ``AutoTokenizer.from_pretrained(path,
use_fast=False)`` (LongBench: ``LlamaTokenizer`` for Llama-2), i.e. the sentencepiece library
itself on the model's ``tokenizer.model``. transformers v5 ignores ``use_fast`` and always builds
the fast (Rust, converted) tokenizer, which can split some text differently; since LongBench cuts
prompts in the middle by token count, that changes prompts. :class:`SentencePieceLlamaTokenizer`
brings v4's slow ``LlamaTokenizer`` back on v5's sentencepiece backend.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend
from transformers.utils import cached_file

TOKENIZER_KINDS = ("slow", "fast")
SENTENCEPIECE_MODEL = "tokenizer.model"


class SentencePieceLlamaTokenizer(SentencePieceBackend):
    """transformers v4's slow ``LlamaTokenizer`` (as of v4.36, the version of the original QJL
    code): token ids are ``sentencepiece.SentencePieceProcessor.encode(text)`` with BOS prepended
    (``add_bos_token``; EOS appended only with ``add_eos_token``), except that special tokens
    written in the text (``<s>``, ``</s>``, ...) become their ids. ``legacy`` (from
    tokenizer_config.json, default True as in v4) keeps sentencepiece's dummy prefix after special
    tokens; ``legacy=False`` drops it there (v4's fix, same ids on text without special tokens).
    Decoding runs sentencepiece's decoder between special tokens (byte-fallback pieces become
    bytes again) and drops the leading space of the first piece, as v4 did."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(
            vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
            add_bos_token=add_bos_token, add_eos_token=add_eos_token, legacy=True if legacy is None else legacy,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs,
        )  # fmt: skip

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        # v4 non-legacy: the dummy prefix is added here (the sentencepiece model has it switched
        # off), so that text right after a special token gets none.
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        out = bos + [0] * len(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + [0] * len(token_ids_1) + eos

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):  # the dummy prefix
            tokens[0] = tokens[0][1:]
        pieces: list[str] = []
        out = ""
        prev_is_special = False
        special = set(self.all_special_tokens)
        for i, token in enumerate(tokens):
            if token in special:  # special tokens are not sentencepiece pieces: written as they are
                if not prev_is_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pieces) + token
                prev_is_special, pieces = True, []
            else:
                pieces.append(token)
                prev_is_special = False
        return out + self.sp_model.decode(pieces)


def sentencepiece_model_file(path: str) -> str | None:
    """The model's ``tokenizer.model`` (local directory or hub repo), or None when it has none."""
    return cached_file(path, SENTENCEPIECE_MODEL, _raise_exceptions_for_missing_entries=False)


def load_tokenizer(path: str, kind: str = "slow"):
    """``slow``: :class:`SentencePieceLlamaTokenizer` when ``path`` has a sentencepiece model
    (Llama-1/2, longchat, vicuna, Mistral), else the model's only (fast) tokenizer; ``fast``: the
    fast tokenizer (``AutoTokenizer``). :func:`tokenizer_kind` tells which one was loaded."""
    from transformers import AutoTokenizer

    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {kind!r}")
    if kind == "slow" and sentencepiece_model_file(path) is not None:
        try:
            import sentencepiece  # noqa: F401
        except ImportError as e:
            raise ImportError("--tokenizer slow needs the sentencepiece package: pip install sentencepiece") from e
        try:
            return SentencePieceLlamaTokenizer.from_pretrained(path)
        except RuntimeError as e:  # a tokenizer.model that is not a sentencepiece model (tiktoken's)
            if "could not parse ModelProto" not in str(e):
                raise
    return AutoTokenizer.from_pretrained(path)


def tokenizer_kind(tokenizer) -> str:
    """``slow`` for the sentencepiece tokenizer, ``fast`` for any other."""
    return "slow" if isinstance(tokenizer, SentencePieceLlamaTokenizer) else "fast"
