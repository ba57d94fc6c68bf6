import numpy as np
import pytest

from fusion_train.tokenizers.multimodal import DocumentTokenizer, seeded_coin
from helpers import SMALL_VOCAB as V


def codes(value=0):
    return np.full((V.image_grid, V.image_grid), value, dtype=np.int64)


def image_ids(value=0):
    return [V.begin_of_image, *[V.image_code_start + value] * V.image_tokens, V.end_of_image]


def test_text_document(text_tokenizer):
    doc = DocumentTokenizer(text_tokenizer, V).document(["Hello world"])
    assert doc.tokens.tolist() == [V.bos, *text_tokenizer.encode(["Hello world"])[0], V.eos]
    assert doc.loss_mask is None


def test_image_text_puts_the_image_first_in_a_seeded_half(text_tokenizer):
    documents = DocumentTokenizer(text_tokenizer, V, seed=7)
    records = [(input_number, i) for input_number in range(2) for i in range(200)]
    firsts = [documents.pair(codes(3), "a red square", r).tokens[1] == V.begin_of_image for r in records]
    assert 0.43 < np.mean(firsts) < 0.57
    assert firsts == [seeded_coin(7, r) for r in records]
    assert firsts != [seeded_coin(8, r) for r in records]
    assert firsts[:200] != firsts[200:]  # record i of another input file tosses its own coin
    caption = text_tokenizer.encode(["a red square"])[0]
    expected = [V.bos, *image_ids(3), *caption, V.eos] if firsts[0] else [V.bos, *caption, *image_ids(3), V.eos]
    assert documents.pair(codes(3), "a red square", (0, 0)).tokens.tolist() == expected


def test_interleaved_keeps_segment_order(text_tokenizer):
    doc = DocumentTokenizer(text_tokenizer, V).document(["Look:", codes(1), "and", codes(2)])
    look, and_ = text_tokenizer.encode(["Look:", "and"])
    assert doc.tokens.tolist() == [V.bos, *look, *image_ids(1), *and_, *image_ids(2), V.eos]


def test_sft_masks_prompts_and_separators(text_tokenizer):
    turns = [(["What is this?", codes(5)], ["A square."]), (["Colour?"], ["Red."])]
    doc = DocumentTokenizer(text_tokenizer, V).sft(turns)
    q1, a1, q2, a2 = text_tokenizer.encode(["What is this?", "A square.", "Colour?", "Red."])
    prompt1 = [*q1, *image_ids(5), V.sft_separator]
    expected = [V.bos, *prompt1, *a1, V.eos, *q2, V.sft_separator, *a2, V.eos]
    assert doc.tokens.tolist() == expected
    mask = [0] * (1 + len(prompt1)) + [1] * (len(a1) + 1) + [0] * (len(q2) + 1) + [1] * (len(a2) + 1)
    assert doc.loss_mask.tolist() == mask


def test_bad_image_codes_are_refused(text_tokenizer):
    documents = DocumentTokenizer(text_tokenizer, V)
    with pytest.raises(ValueError, match="expected the layout's grid"):
        documents.image_block(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        documents.image_block(codes(V.image_codebook_size))
