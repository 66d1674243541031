"""A hub-style ERNIE tokenizer directory loads into a `tokenizers.Tokenizer` that encodes exactly
like its sentencepiece model, and its special tokens are checked against the model config.

Every sentencepiece model here is trained in the test (offline, milliseconds) and laid out like
the hub's: `tokenizer.model` + `tokenizer_config.json` + `special_tokens_map.json` (+ `added_tokens.json`).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, processors

from ernie.chat_template import (
    BOS,
    EOS,
    IMAGE_END,
    IMAGE_PLACEHOLDER,
    IMAGE_START,
    THINK_CLOSE,
    THINK_OPEN,
    VIDEO_END,
    VIDEO_PLACEHOLDER,
    VIDEO_START,
)
from ernie.presets import tiny_dense, tiny_vl
from pipeline.formats import TOKENIZER_FILE
from stages.data.tokenizer_dir import (
    check_special_tokens,
    load_tokenizer_dir,
    save_tokenizer_dir,
    special_token_ids,
    special_token_roles,
)

# Pieces sentencepiece matches anywhere in text, so they get fixed ids 3.. after <unk> <s> </s>.
USER_DEFINED = [BOS, EOS, THINK_OPEN, THINK_CLOSE, IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END]
MASK = "<mask:1>"  # a control piece: matched in text only because the config declares it
HUB_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
HUB_CONFIG = {  # the shape of ERNIE-4.5-0.3B's tokenizer_config.json
    **HUB_ROLES,
    "cls_token": BOS,
    "sep_token": EOS,
    "mask_token": MASK,
    "additional_special_tokens": None,
    "tokenizer_class": "Ernie4_5_Tokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_ernie4_5.Ernie4_5_Tokenizer", None]},
    "chat_template": "{{- cls_token -}}{%- for m in messages -%}{{ m['content'] }}{%- endfor -%}",
}
SAMPLES = [
    "",
    " ",
    "hello world",
    " leading space and trailing space ",
    "two  spaces,   three, \t\ttabs\n\n\nnewlines\r\n",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "naïve café Привет мир 数据模型 训练 😈🤗 ∑∫ ½",
    "<|begin_of_sentence|>User: hi\nAssistant: <think>\n\n</think>\n\nok<|end_of_sentence|>",
    "Picture 1:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> and <|VIDEO_START|><|VIDEO_END|>",
    "almost special: <|IMAGE_START| and <think and think> and <0x41>",
]
TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.text(
    "the quick 数据 Мир 0123 \t\n  é😈<>|_think/IMAGE", max_size=60
)
VISION_FIELDS = {
    IMAGE_PLACEHOLDER: "image_token_id",
    IMAGE_START: "image_start_token_id",
    IMAGE_END: "image_end_token_id",
    VIDEO_PLACEHOLDER: "video_token_id",
    VIDEO_START: "video_start_token_id",
    VIDEO_END: "video_end_token_id",
}


def corpus_text() -> str:
    """A few KB of mixed-script text with digits and whitespace runs, the same on every run."""
    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over a lazy dog model token think image video sentence "
        "数据 模型 训练 Привет мир café naïve déjà 12 345 6789 3.14 + - = ( ) , . ! ?"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(400)]
    return "\n".join(line.replace(" ", "  ", 1) if i % 7 == 0 else line for i, line in enumerate(lines))


def train_model(directory: Path, **options) -> sentencepiece.SentencePieceProcessor:
    """A small BPE shaped like ERNIE's: byte fallback, no dummy prefix, whitespace kept."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    defaults = dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        normalization_rule_name="identity",
        user_defined_symbols=USER_DEFINED,
        control_symbols=[MASK],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), **{**defaults, **options}
    )
    (directory / "corpus.txt").unlink()
    (directory / "tokenizer.vocab").unlink()
    return sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def hub_dir(directory: Path, **options) -> sentencepiece.SentencePieceProcessor:
    """tokenizer.model + the hub's json files; the video placeholder comes from added_tokens.json."""
    processor = train_model(directory, **options)
    (directory / "tokenizer_config.json").write_text(json.dumps(HUB_CONFIG, indent=2))
    special_map = {**HUB_ROLES, "cls_token": BOS, "sep_token": EOS, "mask_token": {"content": MASK, "special": True}}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (directory / "added_tokens.json").write_text(json.dumps({VIDEO_PLACEHOLDER: processor.vocab_size()}))
    return processor


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, sentencepiece.SentencePieceProcessor, Tokenizer]:
    directory = tmp_path_factory.mktemp("hub")
    processor = hub_dir(directory)
    return directory, processor, load_tokenizer_dir(directory)


def expected_ids(processor: sentencepiece.SentencePieceProcessor) -> dict[str, int]:
    ids = {token: processor.piece_to_id(token) for token in USER_DEFINED}
    return {**ids, VIDEO_PLACEHOLDER: processor.vocab_size()}


def vl_config(processor: sentencepiece.SentencePieceProcessor, **changes):
    ids = expected_ids(processor)
    fields = {field: ids[token] for token, field in VISION_FIELDS.items()}
    return tiny_vl().replace(**{"vocab_size": processor.vocab_size() + 1, **fields, **changes})


# ---------------------------------------------------------------------- encoding
def test_loads_the_hub_layout_as_a_fast_tokenizer(hub):
    directory, processor, tokenizer = hub
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.get_vocab_size() == processor.vocab_size() + 1  # + the added video placeholder
    assert tokenizer.post_processor is None


@pytest.mark.parametrize("text", SAMPLES)
def test_encodes_like_sentencepiece_on_varied_text(hub, text):
    _, processor, tokenizer = hub
    assert tokenizer.encode(text, add_special_tokens=False).ids == processor.encode(text)


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_encodes_like_sentencepiece_on_any_text(hub, text):
    _, processor, tokenizer = hub
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert ids == processor.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == processor.decode(ids)


@settings(max_examples=100, deadline=None)
@given(text=TEXT.filter(lambda t: "\u2581" not in t))  # sentencepiece itself decodes "▁" as a space
def test_decode_round_trips_text(hub, text):
    _, _, tokenizer = hub
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_matches_transformers_tokenizers_backend_on_plain_text(hub):
    """TokenizersBackend is what transformers 5.23's AutoTokenizer gives for model_type ernie4_5."""
    from transformers import TokenizersBackend

    directory, _, tokenizer = hub
    reference = TokenizersBackend.from_pretrained(str(directory)).backend_tokenizer
    for text in SAMPLES[:7]:
        assert (
            tokenizer.encode(text, add_special_tokens=False).ids == reference.encode(text, add_special_tokens=False).ids
        )


# ---------------------------------------------------------------------- special tokens
def test_special_tokens_are_single_tokens_at_their_ids(hub):
    _, processor, tokenizer = hub
    assert special_token_ids(tokenizer) == expected_ids(processor)  # the hub layout has no "<pad>"
    text = f"a{BOS}b{MASK}c<s>d"
    assert tokenizer.encode(text).ids[1::2] == [processor.piece_to_id(BOS), processor.piece_to_id(MASK), 1]


def test_roles_come_from_the_json_files(hub):
    directory, _, _ = hub
    roles = special_token_roles(directory)
    assert {k: roles[k] for k in ("bos_token", "eos_token", "pad_token")} == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
    }
    assert roles["mask_token"] == MASK and roles["cls_token"] == BOS


def test_check_passes_for_a_matching_vl_config(hub):
    directory, processor, tokenizer = hub
    ids = check_special_tokens(tokenizer, vl_config(processor), special_token_roles(directory))
    assert ids == expected_ids(processor)


def test_check_names_a_mismatching_vision_field(hub):
    directory, processor, tokenizer = hub
    right = expected_ids(processor)[IMAGE_PLACEHOLDER]
    with pytest.raises(ValueError) as caught:
        check_special_tokens(tokenizer, vl_config(processor, image_token_id=right + 1), special_token_roles(directory))
    assert f"'{IMAGE_PLACEHOLDER}' has tokenizer id {right}, but config image_token_id={right + 1}" in str(caught.value)
    assert "video_token_id" not in str(caught.value)  # only the mismatch is reported


def test_check_names_bos_pad_eos_and_vocab_size(hub):
    directory, processor, tokenizer = hub
    config = vl_config(processor, bos_token_id=2, vocab_size=processor.vocab_size())
    with pytest.raises(ValueError) as caught:
        check_special_tokens(tokenizer, config, special_token_roles(directory))
    message = str(caught.value)
    assert "bos_token '<s>' has tokenizer id 1, but config bos_token_id=2" in message
    assert f"config vocab_size={processor.vocab_size()}" in message
    assert "eos_token" not in message


def test_check_uses_the_bundled_roles_by_default(hub):
    _, processor, tokenizer = hub
    with pytest.raises(ValueError) as caught:
        check_special_tokens(tokenizer, vl_config(processor))
    assert "pad_token '<pad>' is not in the tokenizer's vocabulary, but config pad_token_id=0" in str(caught.value)
    assert f"bos_token '{BOS}' has tokenizer id {processor.piece_to_id(BOS)}, but config bos_token_id=1" in str(
        caught.value
    )


def test_a_dense_config_does_not_check_vision_ids(hub):
    directory, processor, tokenizer = hub
    config = tiny_dense().replace(vocab_size=processor.vocab_size() + 1)  # image_token_id etc. keep their defaults
    assert check_special_tokens(tokenizer, config, special_token_roles(directory))


def test_check_names_chat_tokens_that_are_missing_or_split(tmp_path):
    # <think> is an undeclared control piece (in the vocabulary, spelled out in text); </think> is absent.
    processor = train_model(tmp_path, user_defined_symbols=[BOS, EOS], control_symbols=[THINK_OPEN])
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(HUB_ROLES))
    tokenizer = load_tokenizer_dir(tmp_path)
    config = tiny_dense().replace(vocab_size=processor.vocab_size())
    with pytest.raises(ValueError) as caught:
        check_special_tokens(tokenizer, config, special_token_roles(tmp_path))
    message = str(caught.value)
    assert f"'{THINK_OPEN}' has tokenizer id {processor.piece_to_id(THINK_OPEN)} but text encodes it as" in message
    assert f"'{THINK_CLOSE}' is not in the tokenizer's vocabulary" in message
    assert BOS not in message


# ---------------------------------------------------------------------- saving
def test_save_writes_tokenizer_json_and_copies_the_hub_files(hub, tmp_path):
    directory, processor, tokenizer = hub
    path = save_tokenizer_dir(tokenizer, directory, tmp_path / "dataset")
    assert path == tmp_path / "dataset" / TOKENIZER_FILE
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (path.parent / name).read_bytes() == (directory / name).read_bytes()
    reloaded, from_artifact = Tokenizer.from_file(str(path)), load_tokenizer_dir(path.parent)
    for text in SAMPLES:
        assert reloaded.encode(text).ids == from_artifact.encode(text).ids == processor.encode(text)
    assert special_token_roles(path.parent) == special_token_roles(directory)


def test_save_drops_hub_files_an_earlier_run_left(hub, tmp_path):
    directory, _, tokenizer = hub
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(directory / "tokenizer.model", source)
    path = save_tokenizer_dir(tokenizer, directory, tmp_path / "dataset")
    save_tokenizer_dir(load_tokenizer_dir(source), source, tmp_path / "dataset")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json", "tokenizer.model"]
    save_tokenizer_dir(tokenizer, path.parent, tmp_path / "dataset")  # saving onto its own source is a no-op copy
    assert (path.parent / "tokenizer.model").read_bytes() == (directory / "tokenizer.model").read_bytes()


def test_a_tokenizer_json_is_loaded_as_is_but_adds_no_tokens(hub, tmp_path):
    _, processor, tokenizer = hub
    with_bos = Tokenizer.from_str(tokenizer.to_str())
    with_bos.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    (tmp_path / "tokenizer.json").write_text(with_bos.to_str())
    assert with_bos.encode("hello").ids[0] == 1
    assert load_tokenizer_dir(tmp_path).encode("hello").ids == processor.encode("hello")


# ---------------------------------------------------------------------- bad directories
def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer directory .*nowhere does not exist"):
        load_tokenizer_dir(tmp_path / "nowhere")


def test_a_file_instead_of_a_directory_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"tokenizer.model is not a directory"):
        load_tokenizer_dir(tmp_path / "tokenizer.model")


def test_a_directory_without_tokenizer_files_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(HUB_CONFIG))
    with pytest.raises(ValueError, match=rf"{tmp_path} holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer_dir(tmp_path)


@pytest.mark.parametrize("content", [b"", bytes(range(256)) * 3])
def test_a_corrupt_sentencepiece_model_is_named(tmp_path, content):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer.model is not a readable sentencepiece model"):
        load_tokenizer_dir(tmp_path)


def test_a_corrupt_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizers file"):
        load_tokenizer_dir(tmp_path)


def test_a_corrupt_config_file_is_named(tmp_path):
    train_model(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text("{'bos_token': '<s>'")
    with pytest.raises(ValueError, match=r"special_tokens_map.json is not valid JSON"):
        load_tokenizer_dir(tmp_path)


def test_an_added_token_id_that_contradicts_the_model_is_named(tmp_path):
    processor = train_model(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({THINK_OPEN: 7, VIDEO_PLACEHOLDER: processor.vocab_size()}))
    with pytest.raises(ValueError, match=rf"declares '{THINK_OPEN}' at id 7, but tokenizer.model has it at"):
        load_tokenizer_dir(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({VIDEO_PLACEHOLDER: processor.vocab_size() + 5}))
    with pytest.raises(ValueError, match=rf"at id {processor.vocab_size() + 5}, but the next free id is"):
        load_tokenizer_dir(tmp_path)


@pytest.mark.parametrize(
    "options, named",
    [
        # ERNIE's model adds no dummy prefix; one that does encodes differently after conversion.
        (dict(add_dummy_prefix=True), "add_dummy_prefix=True"),
        # NFKC: tokenizers' precompiled normalizer turns "\r\n" into one space, sentencepiece into two.
        (dict(normalization_rule_name="nmt_nfkc"), "rule='nmt_nfkc'"),
    ],
    ids=["dummy-prefix", "nfkc"],
)
def test_a_model_the_conversion_cannot_reproduce_is_refused(tmp_path, options, named):
    train_model(tmp_path, **options)
    with pytest.raises(ValueError, match=r"tokenizer.model: the converted tokenizer does not encode like") as caught:
        load_tokenizer_dir(tmp_path)
    assert named in str(caught.value)


def test_a_unigram_model_is_refused(tmp_path):
    # tokenizers' unigram matches byte pieces such as "<0x41>" written out in text; sentencepiece does not.
    train_model(tmp_path, model_type="unigram", vocab_size=330)
    with pytest.raises(ValueError, match=r"tokenizer.model is a sentencepiece unigram model; only BPE"):
        load_tokenizer_dir(tmp_path)
