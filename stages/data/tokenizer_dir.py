"""ERNIE 4.5's own tokenizer, read from a local copy of the hub files, for real runs.

    data.tokenizer=/models/ERNIE-4.5-0.3B-PT     # a directory holding the hub's tokenizer files

The hub directory holds a sentencepiece `tokenizer.model` (BPE with byte fallback, no dummy
prefix), `tokenizer_config.json` and `special_tokens_map.json` naming the special tokens (bos
`<s>`, eos `</s>`, pad and unk `<unk>`, cls `<|begin_of_sentence|>`, sep `<|end_of_sentence|>`),
sometimes `added_tokens.json`, and in newer revisions a ready `tokenizer.json`. Its
`tokenizer_class` points at remote code; transformers 5.23 ignores that for `ernie4_5` and loads
`TokenizersBackend`, which converts the model with `SentencePieceExtractor` and
`SpmConverter.build_tokenizer_from_spm_proto`. We call those two directly and add the tokens
ourselves: `TokenizersBackend` drops sentencepiece's user-defined pieces (such as `<think>`,
which sentencepiece always matches in text) once `tokenizer_config.json` lists its own
`additional_special_tokens`.

The converted tokenizer must encode exactly like `tokenizer.model`; a probe text checks it on
every load, so a sentencepiece option the conversion does not reproduce fails loudly here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import sentencepiece
from tokenizers import AddedToken, Tokenizer

from ernie.chat_template import BOS, EOS, SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN, VISION_TOKENS
from ernie.config import ErnieConfig
from pipeline.formats import TOKENIZER_FILE

from .tokenizer import PAD

FAST_FILE, SENTENCEPIECE_FILE = "tokenizer.json", "tokenizer.model"
CONFIG_FILE, SPECIAL_MAP_FILE, ADDED_FILE = "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"
ORIGINAL_FILES = (SENTENCEPIECE_FILE, CONFIG_FILE, SPECIAL_MAP_FILE, ADDED_FILE)
"""Hub files copied into the dataset artifact next to the `tokenizer.json` we write."""

CHAT_TOKENS = (BOS, EOS, THINK_OPEN, THINK_CLOSE)
VISION_TOKEN_FIELDS = dict(
    zip(
        ("image_token_id", "image_start_token_id", "image_end_token_id")
        + ("video_token_id", "video_start_token_id", "video_end_token_id"),
        VISION_TOKENS,
        strict=True,
    )
)
"""`ErnieConfig` field -> the token string whose id it must hold (VISION_TOKENS is in field order)."""
ROLE_FIELDS = {"pad_token": "pad_token_id", "bos_token": "bos_token_id", "eos_token": "eos_token_id"}
BUNDLED_ROLES = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS}
"""Roles of the bundled byte-level BPE (`stages.data.tokenizer`), the default of `check_special_tokens`."""

# sentencepiece_model.proto enums: user-defined pieces match anywhere in text.
_USER_DEFINED = 4
_BPE = 2
_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
# Mixed scripts, digits, whitespace runs, tabs, newlines, an emoji (byte fallback) and a rare symbol.
# "\r\n" catches NFKC models: tokenizers' precompiled normalizer gives one space where sentencepiece gives two.
PROBE_TEXT = "Hello, world!  Two  spaces\tand\ttabs\n\nnew lines\r\n12345 3.14 naïve café 数据模型 😈 ∑ end"


def load_tokenizer_dir(path: str | Path) -> Tokenizer:
    """The directory's tokenizer (`tokenizer.json` if present, else converted `tokenizer.model`)."""
    directory = _existing_dir(path)
    if (directory / FAST_FILE).is_file():
        tokenizer = _read_fast(directory / FAST_FILE)
    elif (directory / SENTENCEPIECE_FILE).is_file():
        tokenizer = _convert_sentencepiece(directory)
    else:
        raise ValueError(
            f"tokenizer directory {directory} holds neither {FAST_FILE} nor {SENTENCEPIECE_FILE} "
            "(expected a local copy of the hub's tokenizer files)"
        )
    # The data stage wraps documents in bos/eos itself; a post-processor would add a second <s>.
    tokenizer.post_processor = None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def special_token_roles(path: str | Path) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: every `*_token` the config files name (special_tokens_map wins)."""
    directory = _existing_dir(path)
    roles: dict[str, str] = {}
    for name in (CONFIG_FILE, SPECIAL_MAP_FILE):
        for key, value in _read_json(directory / name).items():
            token = _token_text(value)
            if key.endswith("_token") and token is not None:
                roles[key] = token
    return roles


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Id of every `SPECIAL_TOKENS` entry that text encodes as that one token; others are left out."""
    found = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and tokenizer.encode(token, add_special_tokens=False).ids == [token_id]:
            found[token] = token_id
    return found


def check_special_tokens(
    tokenizer: Tokenizer, model_config: ErnieConfig, roles: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Raise ValueError listing every disagreement between tokenizer and model config; else the ids.

    `roles` names the pad/bos/eos tokens (`special_token_roles(dir)` for a hub directory); the
    default is the bundled BPE's. Chat tokens must be single tokens; a VL config's image/video ids
    must be the tokenizer's ids of those tokens.
    """
    ids = special_token_ids(tokenizer)
    problems = [
        f"{token!r} {_why_not_single(tokenizer, token)} (the chat template needs it)"
        for token in CHAT_TOKENS
        if token not in ids
    ]
    if model_config.vision is not None:
        problems += _vision_problems(tokenizer, ids, model_config)
    problems += _role_problems(tokenizer, BUNDLED_ROLES if roles is None else roles, model_config)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > model_config.vocab_size:
        problems.append(f"the tokenizer has {size} tokens, more than config vocab_size={model_config.vocab_size}")
    if problems:
        raise ValueError("tokenizer and model config disagree:\n  " + "\n  ".join(problems))
    return ids


def _vision_problems(tokenizer: Tokenizer, ids: dict[str, int], model_config: ErnieConfig) -> list[str]:
    problems = []
    for field, token in VISION_TOKEN_FIELDS.items():
        wanted = getattr(model_config, field)
        if token not in ids:
            problems.append(f"{token!r} {_why_not_single(tokenizer, token)}, but config {field}={wanted}")
        elif ids[token] != wanted:
            problems.append(f"{token!r} has tokenizer id {ids[token]}, but config {field}={wanted}")
    return problems


def _role_problems(tokenizer: Tokenizer, roles: Mapping[str, str], model_config: ErnieConfig) -> list[str]:
    problems = []
    for role, field in ROLE_FIELDS.items():
        wanted, token = getattr(model_config, field), roles.get(role)
        token_id = None if token is None else tokenizer.token_to_id(token)
        if token is None:
            problems.append(f"the tokenizer names no {role}, but config {field}={wanted}")
        elif token_id is None:
            problems.append(f"{role} {token!r} is not in the tokenizer's vocabulary, but config {field}={wanted}")
        elif token_id != wanted:
            problems.append(f"{role} {token!r} has tokenizer id {token_id}, but config {field}={wanted}")
    return problems


def save_tokenizer_dir(tokenizer: Tokenizer, source_dir: str | Path, output_dir: str | Path) -> Path:
    """Write `output_dir/tokenizer/tokenizer.json` and copy the hub files beside it; returns the json path."""
    source = _existing_dir(source_dir)
    target = Path(output_dir) / TOKENIZER_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(target))
    for name in ORIGINAL_FILES:
        original, copy = source / name, target.parent / name
        if original.is_file():
            if not copy.exists() or not copy.samefile(original):
                shutil.copyfile(original, copy)
        elif copy.exists():  # left by an earlier run into the same directory: not part of this source
            copy.unlink()
    return target


# ---------------------------------------------------------------------- reading the directory
def _existing_dir(path: str | Path) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise ValueError(f"tokenizer directory {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"tokenizer path {directory} is not a directory (point it at the folder holding the files)")
    return directory


def _read_fast(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for any parse failure
        raise ValueError(f"{path} is not a readable tokenizers file: {error}") from error


def _read_json(path: Path) -> dict:
    """The file's object, {} when it is absent; a broken file is an error naming it."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def _token_text(value) -> str | None:
    """A token as the hub files write it: a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _declared_tokens(directory: Path) -> list[tuple[str, int | None, bool]]:
    """(token, id or None, special) the json files declare; tokens with ids first, in id order."""
    config = _read_json(directory / CONFIG_FILE)
    with_ids: dict[str, tuple[int, bool]] = {}
    for token, token_id in _read_json(directory / ADDED_FILE).items():
        with_ids[token] = (_token_id(token_id, directory / ADDED_FILE), False)
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        if _token_text(entry) is not None:
            special = bool(entry.get("special", True))
            with_ids[_token_text(entry)] = (_token_id(token_id, directory / CONFIG_FILE), special)
    named = list(special_token_roles(directory).values())
    for source in (config, _read_json(directory / SPECIAL_MAP_FILE)):
        named += [t for t in map(_token_text, source.get("additional_special_tokens") or []) if t is not None]
    declared = [(token, token_id, special) for token, (token_id, special) in sorted(with_ids.items(), key=_by_id)]
    return declared + [(token, None, True) for token in dict.fromkeys(named) if token not in with_ids]


def _token_id(value, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path} gives token id {value!r}, which is not an integer") from None


def _by_id(item: tuple[str, tuple[int, bool]]) -> int:
    return item[1][0]


# ---------------------------------------------------------------------- sentencepiece -> tokenizers
def _convert_sentencepiece(directory: Path) -> Tokenizer:
    model_path = directory / SENTENCEPIECE_FILE
    processor = _read_sentencepiece(model_path)
    # transformers is imported only here: the bundled-tokenizer path never needs it.
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(str(model_path))
    model_type = extractor.proto.trainer_spec.model_type
    if model_type != _BPE:
        # A unigram lattice in `tokenizers` matches byte pieces such as "<0x41>" spelled out in text, which
        # sentencepiece never does (and transformers 5.23's TokenizersBackend cannot load unigram at all).
        raise ValueError(
            f"{model_path} is a sentencepiece {_MODEL_TYPES.get(model_type, model_type)} model; "
            "only BPE models (as ERNIE 4.5's) convert exactly"
        )
    extracted = extractor.extract(None)
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(
        proto=extractor.proto, vocab=extracted["vocab"], merges=extracted.get("merges")
    )
    _add_declared_tokens(tokenizer, directory)
    already = {added.content for added in tokenizer.get_added_tokens_decoder().values()}
    user_defined = [p.piece for p in extractor.proto.pieces if p.type == _USER_DEFINED and p.piece not in already]
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in user_defined])
    _check_reproduces(tokenizer, processor, model_path, extractor.proto.normalizer_spec)
    return tokenizer


def _read_sentencepiece(model_path: Path) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_path))
    except (OSError, RuntimeError) as error:
        raise ValueError(f"{model_path} is not a readable sentencepiece model: {error}") from error
    return processor


def _add_declared_tokens(tokenizer: Tokenizer, directory: Path) -> None:
    """Make every token the json files declare match in text as one token, at the id they declare.

    A token named without an id that the model lacks is skipped, not given a fresh id: that id
    would lie outside the model's embedding. `check_special_tokens` reports the ones that matter.
    """
    for token, wanted, special in _declared_tokens(directory):
        have = tokenizer.token_to_id(token)
        if have is None and wanted is None:
            continue
        if have is None and wanted != tokenizer.get_vocab_size():
            raise ValueError(
                f"{directory} declares {token!r} at id {wanted}, but the next free id is {tokenizer.get_vocab_size()}"
            )
        if have is not None and wanted is not None and have != wanted:
            raise ValueError(
                f"{directory} declares {token!r} at id {wanted}, but {SENTENCEPIECE_FILE} has it at {have}"
            )
        added = AddedToken(token, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([added])
        else:
            tokenizer.add_tokens([added])


def _check_reproduces(
    tokenizer: Tokenizer, processor: sentencepiece.SentencePieceProcessor, model_path: Path, normalizer_spec
) -> None:
    expected = processor.encode(PROBE_TEXT)
    converted = tokenizer.encode(PROBE_TEXT, add_special_tokens=False).ids
    if converted != expected:
        differing = (i for i, (a, b) in enumerate(zip(converted, expected, strict=False)) if a != b)
        at = next(differing, min(len(converted), len(expected)))
        raise ValueError(
            f"{model_path}: the converted tokenizer does not encode like sentencepiece (probe text "
            f"{PROBE_TEXT!r}, from token {at}: {converted[at : at + 5]} vs {expected[at : at + 5]}); this "
            f"model's normalizer is not reproduced (rule={normalizer_spec.name!r}, "
            f"add_dummy_prefix={normalizer_spec.add_dummy_prefix}, "
            f"remove_extra_whitespaces={normalizer_spec.remove_extra_whitespaces})"
        )


def _why_not_single(tokenizer: Tokenizer, token: str) -> str:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        return "is not in the tokenizer's vocabulary"
    pieces = tokenizer.encode(token, add_special_tokens=False).ids
    return f"has tokenizer id {token_id} but text encodes it as {len(pieces)} tokens {pieces}"
