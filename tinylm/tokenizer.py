"""The word-level tokenizer of the tiny model: one token per vocabulary word, per number of the
tasks (100-999) and per punctuation mark."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import synthetic_tasks

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3
PAD, UNK, BOS, EOS = SPECIAL_TOKENS
WORD_START = "\u2581"  # Metaspace's word marker; alone it is the token before a number


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``synthetic_tasks.VOCABULARY`` and ``NUMBERS``:
    whitespace runs become one space, words are split off with a leading marker, a digit run is
    one token after a bare marker, punctuation stands apart; encoding adds BOS; decoding restores
    spaces. Other numbers are unknown tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for token in (WORD_START, *synthetic_tasks.PUNCTUATION, *synthetic_tasks.NUMBERS):
        vocab[token] = len(vocab)
    for word in synthetic_tasks.VOCABULARY:
        vocab[WORD_START + word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=4096
    )
