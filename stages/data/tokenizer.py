"""A byte-level BPE trained on the corpus, with ERNIE's special tokens at fixed ids.

Special tokens come first, in `ernie.chat_template.SPECIAL_TOKENS` order, so pad=0,
bos=1, eos=2, <think>=3, </think>=4 whatever the corpus (the model config hard-codes
pad/bos/eos ids). Digits are split one per token before BPE, so "42" is "4" "2": numbers
share digit embeddings and a small model can learn arithmetic digit by digit instead of
memorising one token per number. Byte-level means no text is ever out of vocabulary. The
merges are closed (`fast_bpe`), so the data stage can encode with tiktoken and get the ids HF
tokenizers gives everywhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ernie.chat_template import BOS, EOS, SPECIAL_TOKENS
from pipeline.formats import TOKENIZER_FILE

from .fast_bpe import close_merges

PAD = SPECIAL_TOKENS[0]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train the BPE and close its merges; deterministic for the same texts (the trainer breaks ties by pair order)."""
    tokenizer = Tokenizer.from_str(close_merges(train_bpe(texts, vocab_size).to_str()))  # tiktoken encodes it alike
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:  # a tokenizers upgrade changed the layout
            raise RuntimeError(f"special token {token!r} got id {tokenizer.token_to_id(token)}, not {expected_id}")
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """The bundled layout as HF tokenizers trains it, merges not yet closed."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, output_dir: Path) -> Path:
    """`tokenizer/tokenizer.json`, plus the small config files HF `AutoTokenizer` looks for."""
    path = output_dir / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    (path.parent / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (path.parent / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return path


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document as bos + tokens + eos (the packer relies on the explicit boundaries)."""
    return [[BOS_ID, *encoding.ids, EOS_ID] for encoding in tokenizer.encode_batch(texts)]
