"""ferry.train.tokenizer: reserved ids, `</s>`, byte fallback, digit splitting, saving."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ferry.errors import FerryError
from ferry.train.datasets.dates import make_date_task
from ferry.train.tokenizer import (
    reserved_tokens,
    save_tokenizer,
    sentinel,
    special_token_ids,
    train_tokenizer,
)

NUM_SENTINELS = 6
UNSEEN = ["Ω漢字🙂", "naïve café — 東京 2024 ✓", "\u00e9\u0301 e\u0301 ß ẞ", "tab\tand  two spaces"]


def corpus() -> list[str]:
    train_rows, _ = make_date_task(num_train=600, num_eval=1, seed=3)
    return [text for row in train_rows for text in (row["source"], row["target"])] + [
        "the quick brown fox jumps over the lazy dog",
        "pack my box with five dozen liquor jugs",
    ] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=300, num_sentinels=NUM_SENTINELS)


def test_reserved_ids_come_first(tokenizer):
    expected = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"] + [
        f"<extra_id_{i}>" for i in range(NUM_SENTINELS)
    ]
    assert reserved_tokens(NUM_SENTINELS) == expected
    for i, token in enumerate(expected):
        assert tokenizer.token_to_id(token) == i
        assert tokenizer.id_to_token(i) == token
    assert special_token_ids(tokenizer) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4,
                                            "decoder_start": 1}
    assert sentinel(3) == "<extra_id_3>"
    assert tokenizer.token_to_id(sentinel(NUM_SENTINELS)) is None
    assert tokenizer.get_vocab_size() <= 300


def test_encode_appends_eos(tokenizer):
    for text in ["March 5, 2021", "x", ""]:
        encoding = tokenizer.encode(text)
        assert encoding.ids[-1] == 2
        assert encoding.tokens[-1] == "</s>"
        assert encoding.ids.count(2) == 1
    assert tokenizer.encode("").ids == [2]
    # decode drops the special token again
    assert tokenizer.decode(tokenizer.encode("March 5, 2021").ids) == "March 5, 2021"


def test_training_text_round_trips(tokenizer):
    for text in corpus()[:50]:
        ids = tokenizer.encode(text).ids
        assert 3 not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", UNSEEN)
def test_byte_fallback_round_trips_unseen_characters(tokenizer, text):
    encoding = tokenizer.encode(text)
    unk = tokenizer.token_to_id("<unk>")
    assert unk not in encoding.ids
    assert all(i is not None and 0 <= i < tokenizer.get_vocab_size() for i in encoding.ids)
    assert tokenizer.decode(encoding.ids, skip_special_tokens=True) == text
    # unseen characters cost more than one token each: they really go through bytes
    if text == "Ω漢字🙂":
        assert len(encoding.ids) - 1 >= len(text.encode("utf-8")) // 2


def test_digits_are_split_one_per_token(tokenizer):
    text = "12345 on 2021-03-05 and 1999.12.31"
    encoding = tokenizer.encode(text)
    digit_tokens = [t for t in encoding.tokens if any(c.isdigit() for c in t)]
    assert all(len(token) == 1 for token in digit_tokens), digit_tokens
    assert "".join(digit_tokens) == "".join(c for c in text if c.isdigit())
    # years seen hundreds of times in training still never become one token
    assert tokenizer.token_to_id("2021") is None
    assert tokenizer.token_to_id("20") is None


def test_save_tokenizer_loads_with_identical_encodings(tokenizer, tmp_path):
    path = save_tokenizer(tokenizer, tmp_path / "sub" / "tokenizer.json")
    assert path == tmp_path / "sub" / "tokenizer.json"
    loaded = Tokenizer.from_file(str(path))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    texts = corpus()[:20] + UNSEEN + ["", "12/31/1999"]
    for text in texts:
        a, b = tokenizer.encode(text), loaded.encode(text)
        assert a.ids == b.ids
        assert a.tokens == b.tokens
        assert loaded.decode(b.ids, skip_special_tokens=True) == text
    batch = [e.ids for e in loaded.encode_batch(texts)]
    assert batch == [e.ids for e in tokenizer.encode_batch(texts)]
    assert special_token_ids(loaded) == special_token_ids(tokenizer)


def test_training_is_deterministic():
    a = train_tokenizer(corpus(), vocab_size=300, num_sentinels=2)
    b = train_tokenizer(corpus(), vocab_size=300, num_sentinels=2)
    assert a.get_vocab() == b.get_vocab()
    assert a.to_str() == b.to_str()


def test_special_token_ids_requires_the_reserved_tokens():
    bare = Tokenizer(models.BPE(unk_token="[UNK]"))
    bare.pre_tokenizer = pre_tokenizers.Whitespace()
    bare.train_from_iterator(
        ["hello world"] * 5,
        trainers.BpeTrainer(vocab_size=50, special_tokens=["[UNK]", "</s>"], show_progress=False),
    )
    with pytest.raises(FerryError) as info:
        special_token_ids(bare)
    message = str(info.value)
    for name in ("pad", "bos", "unk", "mask"):
        assert name in message
    assert "'eos'" not in message  # </s> is present, so eos is not reported missing
