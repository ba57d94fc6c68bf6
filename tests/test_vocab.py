import pytest
import torch

from fusion_train.vocab import Modality, VocabLayout


def test_released_chameleon_ids():
    vocab = VocabLayout()
    assert (vocab.bos, vocab.pad, vocab.eos, vocab.unk) == (0, 1, 2, 3)
    assert (vocab.image_code_start, vocab.image_code_end) == (4, 8196)
    assert (vocab.end_of_image, vocab.begin_of_image) == (8196, 8197)
    assert vocab.sft_separator == 8710  # <reserved08706>
    assert vocab.image_block_length == 1026


def test_small_layout_follows_the_same_rule():
    vocab = VocabLayout(image_codebook_size=512, image_grid=8, vocab_size=4096, n_reserved=600)
    assert vocab.image_code_end == 516
    assert (vocab.end_of_image, vocab.begin_of_image) == (516, 517)
    assert vocab.sft_separator == 518 + 512
    assert vocab.text_start == 518 + 600
    assert vocab.image_block_length == 66


def test_modality_of_every_region():
    vocab = VocabLayout(image_codebook_size=16, image_grid=2, vocab_size=1000, n_reserved=520)
    ids = torch.tensor([0, 3, 4, 19, 20, 21, 22, vocab.sft_separator, vocab.text_start - 1, vocab.text_start, 999])
    expected = [Modality.SPECIAL] * 2 + [Modality.IMAGE] * 2 + [Modality.SPECIAL] * 5 + [Modality.TEXT] * 2
    assert vocab.modality_of(ids).tolist() == [int(m) for m in expected]


def test_masks_partition_the_vocabulary():
    vocab = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=2048, n_reserved=513)
    masks = [vocab.modality_mask(m) for m in Modality]
    assert torch.stack(masks).sum(0).eq(1).all()
    assert masks[Modality.IMAGE].sum() == 64
    assert masks[Modality.SPECIAL].sum() == 4 + 2 + 513
    assert masks[Modality.TEXT].sum() == 2048 - 64 - 4 - 2 - 513


def test_chameleon_layout_extended_with_audio_keeps_every_old_id():
    old, extended = VocabLayout(), VocabLayout(vocab_size=65536 + 2 * 1024, audio_codebook_size=1024, audio_levels=2)
    assert old.modalities == [Modality.TEXT, Modality.IMAGE, Modality.SPECIAL]
    assert extended.modalities == [Modality.TEXT, Modality.IMAGE, Modality.SPECIAL, Modality.AUDIO]
    for modality in old.modalities:
        assert extended.id_ranges(modality) == old.id_ranges(modality)
    assert extended.id_ranges(Modality.AUDIO) == [(65536, 67584)]
    assert (extended.begin_of_audio, extended.end_of_audio) == (8198, 8199)  # <reserved08194>, <reserved08195>
    assert extended.sft_separator not in (extended.begin_of_audio, extended.end_of_audio)
    assert extended.audio_level_range(1) == (66560, 67584)
    assert extended.control_token_names() == old.control_token_names()


def test_audio_codes_lie_frame_by_frame_each_level_in_its_own_range():
    vocab = VocabLayout(image_codebook_size=16, image_grid=2, vocab_size=1000 + 3 * 8, n_reserved=520,
                        audio_codebook_size=8, audio_levels=3)  # fmt: skip
    codes = torch.tensor([[0, 7], [1, 2], [3, 4]])  # [levels, frames]
    ids = vocab.audio_codes_to_ids(codes)
    assert ids.tolist() == [1000, 1009, 1019, 1007, 1010, 1020]
    assert vocab.modality_of(ids).eq(int(Modality.AUDIO)).all()
    assert torch.equal(vocab.ids_to_audio_codes(ids), codes)
    with pytest.raises(ValueError, match="not a valid audio segment"):
        vocab.ids_to_audio_codes(ids[[1, 0, 2]])  # a level-1 id at a level-0 position
    with pytest.raises(ValueError, match="whole frames"):
        vocab.ids_to_audio_codes(ids[:4])
    with pytest.raises(ValueError, match="audio codes must lie in"):
        vocab.audio_codes_to_ids(torch.full((3, 1), 8))
    masks = [vocab.modality_mask(m) for m in Modality]
    assert torch.stack(masks).sum(0).eq(1).all() and masks[Modality.AUDIO].sum() == 24


def test_code_id_round_trip_and_range_errors():
    vocab = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=2048, n_reserved=513)
    codes = torch.arange(64)
    assert torch.equal(vocab.id_to_code(vocab.code_to_id(codes)), codes)
    with pytest.raises(ValueError, match="image codes must lie in"):
        vocab.code_to_id(torch.tensor([64]))
    with pytest.raises(ValueError, match="image-code ids must lie in"):
        vocab.id_to_code(torch.tensor([3]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_reserved": 100}, "n_reserved"),
        ({"vocab_size": 9000}, "leaves no room for text"),
        ({"image_grid": 0}, "must be positive"),
        ({"audio_codebook_size": 1024}, "both be positive"),
        ({"audio_codebook_size": 1024, "audio_levels": 56}, "no room for 56 x 1024 audio codes"),
    ],
)
def test_bad_layouts_are_refused_with_the_setting_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VocabLayout(**kwargs)
