"""The word-level tokenizer of the tiny model: one token per vocabulary word, digit and
punctuation mark, so a number is copied digit by digit."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import synthetic_tasks

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3
PAD, UNK, BOS, EOS = SPECIAL_TOKENS
WORD_START = "\u2581"  # Metaspace's word marker; alone it is the token before a number


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` over ``synthetic_tasks.VOCABULARY``: whitespace runs become
    one space, words are split off with a leading marker, digits one by one, punctuation apart;
    encoding adds BOS; decoding restores spaces."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for token in (WORD_START, *"0123456789", *synthetic_tasks.PUNCTUATION):
        vocab[token] = len(vocab)
    for word in synthetic_tasks.VOCABULARY:
        vocab[WORD_START + word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always", split=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, model_max_length=4096
    )
