import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_train.tokenizers.text import TextTokenizer, TokenizerError, train_text_tokenizer
from fusion_train.vocab import SPECIAL_NAMES, VocabLayout
from helpers import SMALL_VOCAB, english_documents, write_jsonl

# Any Unicode scalar value: every code point but the surrogates, which UTF-8 cannot encode.
unicode_text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300)
CONTROL_NAMES = [*SPECIAL_NAMES.values(), *SMALL_VOCAB.control_token_names()]


def test_ids_follow_the_chameleon_layout(text_tokenizer):
    sp = text_tokenizer.sp
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert sp.id_to_piece(SMALL_VOCAB.image_code_start) == "IMGIMGAZ"  # code 0
    assert sp.id_to_piece(SMALL_VOCAB.end_of_image) == "<eoss>"
    assert sp.id_to_piece(SMALL_VOCAB.begin_of_image) == "<racm3:break>"
    assert sp.id_to_piece(SMALL_VOCAB.sft_separator) == f"<reserved{SMALL_VOCAB.sft_separator - 4:05d}>"
    assert all(sp.is_control(i) for i in range(SMALL_VOCAB.image_code_start, SMALL_VOCAB.text_start))
    assert not sp.is_control(SMALL_VOCAB.text_start)
    assert SMALL_VOCAB.text_start < sp.get_piece_size() <= SMALL_VOCAB.vocab_size


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
def test_any_unicode_round_trips_and_yields_only_text_ids(text_tokenizer, text):
    ids = text_tokenizer.encode([text])[0]
    assert text_tokenizer.decode([ids])[0] == text
    assert all(i >= SMALL_VOCAB.text_start for i in ids)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(st.sampled_from(CONTROL_NAMES), unicode_text), max_size=8))
def test_literal_control_names_in_text_stay_text(text_tokenizer, parts):
    text = "".join(parts)
    ids = text_tokenizer.encode([text])[0]
    assert all(i >= SMALL_VOCAB.text_start for i in ids)
    assert text_tokenizer.decode([ids])[0] == text


def test_batches_of_real_text_round_trip(text_tokenizer):
    documents = english_documents(50)
    ids = text_tokenizer.encode(documents)
    assert text_tokenizer.decode(ids) == documents
    assert sum(map(len, ids)) < sum(map(len, documents)) / 2.5  # BPE merged real words


def test_training_is_deterministic(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in english_documents(80)])
    first = train_text_tokenizer([corpus], tmp_path / "a.model", SMALL_VOCAB, seed=3)
    second = train_text_tokenizer([corpus], tmp_path / "b.model", SMALL_VOCAB, seed=3)
    assert first.fingerprint == second.fingerprint


def test_a_model_of_another_layout_is_refused(text_tokenizer, tmp_path):
    other = VocabLayout(image_codebook_size=32, image_grid=4, vocab_size=2048, n_reserved=513)
    with pytest.raises(TokenizerError, match="does not follow the vocabulary layout.*id 36"):
        TextTokenizer(text_tokenizer.path, other)
    with pytest.raises(TokenizerError, match="not found"):
        TextTokenizer(tmp_path / "missing.model", SMALL_VOCAB)
