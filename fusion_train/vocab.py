"""The unified token-id layout shared by text, images and control tokens.

Chameleon's released layout, with every size a parameter (a demo vocabulary is small) and the
rule fixed, so that the released weights import without remapping:

    0 <s>   1 <pad>   2 </s>   3 <unk>
    4 .. 4+C-1            image code c  ->  id 4 + c          (C = image_codebook_size)
    4+C                   <eoss>         end of image
    5+C                   <racm3:break>  begin of image
    6+C .. 6+C+R-1        reserved control ids (R = n_reserved); the 513th of them, id 8710 in the
                          released layout (`<reserved08706>`), separates an SFT prompt from its answer
    6+C+R .. A-1          text pieces
    A .. vocab_size-1     audio codes (none in Chameleon's layout): L levels of K codes each,
                          level q's code c -> id A + q*K + c  (A = vocab_size - L*K)

An image in a sequence is `<racm3:break>`, image_grid**2 codes in raster order, `<eoss>`. Audio is
`<begin-audio>`, then frame by frame the frame's L residual-quantizer codes in level order, then
`<end-audio>`; the two markers are the first two reserved ids (8198 and 8199 in the released layout).
A video is `<begin-video>`, its header as text, then per sampled frame the frame's image and the
sound of its span as audio, then `<end-video>` (tokenizers/video.py); the markers are the next two
reserved ids (8200 and 8201).

New code ranges sit after every existing id: a model extends to a larger layout by appending rows to
its embedding and output (`fusion_train.train.vocab_extension`), every old id keeping its meaning.
Each residual level has its own range, not one shared one: a level-q code and a level-r code of the
same number are unrelated vectors of different codebooks, so sharing an embedding would make the
model untangle them from position alone, and separate ranges let generation admit at each position
only the level that belongs there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import torch


class Modality(IntEnum):
    """What kind of token an id is: the list of the vocabulary's modalities. Per-modality loss sums,
    metrics (`loss/{name}`), validation keys and report panels are indexed by it and iterate over
    it; `VocabLayout.id_ranges` says which ids are each. A new modality is a new member here and its
    ranges there."""

    TEXT = 0
    IMAGE = 1
    SPECIAL = 2
    AUDIO = 3  # after SPECIAL: the members' numbers (indices of metric sums) never change

    @property
    def key(self) -> str:
        """Its name in metric keys: loss/text, eval/loss_image, ..."""
        return self.name.lower()


# The per-modality loss sums are indexed by a target's modality, plus len(Modality) when the target
# is in a video block: video frames and their sound are logged apart from still images and clips.
LOSS_GROUPS = 2 * len(Modality)


def loss_group(modality: torch.Tensor, in_video: torch.Tensor) -> torch.Tensor:
    """Each target's index in the per-modality loss sums (LOSS_GROUPS)."""
    return modality + len(Modality) * in_video.long()


BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
UNK_ID = 3
IMAGE_CODE_OFFSET = 4
# `<reserved08706>` is the 513th reserved id after `<racm3:break>` (8197 + 513 = 8710).
SFT_SEPARATOR_RESERVED_INDEX = 512
BEGIN_OF_AUDIO_RESERVED_INDEX, END_OF_AUDIO_RESERVED_INDEX = 0, 1
BEGIN_OF_VIDEO_RESERVED_INDEX, END_OF_VIDEO_RESERVED_INDEX = 2, 3


@dataclass(frozen=True)
class VocabLayout:
    image_codebook_size: int = 8192
    image_grid: int = 32  # an image is image_grid x image_grid codes
    vocab_size: int = 65536
    n_reserved: int = 1024
    audio_codebook_size: int = 0  # K: codes per residual level (0: no audio)
    audio_levels: int = 0  # L: residual-quantizer levels per audio frame

    def __post_init__(self) -> None:
        if self.image_codebook_size < 1 or self.image_grid < 1:
            raise ValueError(
                f"vocab: image_codebook_size ({self.image_codebook_size}) and image_grid "
                f"({self.image_grid}) must be positive"
            )
        if self.n_reserved <= SFT_SEPARATOR_RESERVED_INDEX:
            raise ValueError(
                f"vocab.n_reserved={self.n_reserved} must exceed {SFT_SEPARATOR_RESERVED_INDEX}: "
                "the SFT separator is reserved id number "
                f"{SFT_SEPARATOR_RESERVED_INDEX} (id 8710 in Chameleon's layout)"
            )
        if self.vocab_size <= self.text_start:
            raise ValueError(
                f"vocab.vocab_size={self.vocab_size} leaves no room for text: image codes and "
                f"control ids already take ids 0..{self.text_start - 1}; raise vocab_size or "
                "lower image_codebook_size / n_reserved"
            )
        if (self.audio_codebook_size > 0) != (self.audio_levels > 0) or min(self.audio_codebook_size,
                                                                           self.audio_levels) < 0:  # fmt: skip
            raise ValueError(
                f"vocab: audio_codebook_size ({self.audio_codebook_size}) and audio_levels ({self.audio_levels}) "
                "must both be positive (a layout with audio) or both 0"
            )
        if self.text_end <= self.text_start:
            raise ValueError(
                f"vocab.vocab_size={self.vocab_size} has no room for {self.audio_levels} x {self.audio_codebook_size} "
                f"audio codes after the image codes, control and text ids (0..{self.text_start - 1} and up): raise "
                f"vocab_size to at least {self.text_start + 1 + self.audio_ids} (to extend a trained model, by "
                f"{self.audio_ids}: old ids keep their place)"
            )

    # --- fixed positions -------------------------------------------------------------------
    bos: ClassVar[int] = BOS_ID
    pad: ClassVar[int] = PAD_ID
    eos: ClassVar[int] = EOS_ID
    unk: ClassVar[int] = UNK_ID

    @property
    def image_code_start(self) -> int:
        return IMAGE_CODE_OFFSET

    @property
    def image_code_end(self) -> int:
        """One past the last image-code id."""
        return IMAGE_CODE_OFFSET + self.image_codebook_size

    @property
    def end_of_image(self) -> int:
        return self.image_code_end

    @property
    def begin_of_image(self) -> int:
        return self.image_code_end + 1

    @property
    def reserved_start(self) -> int:
        return self.begin_of_image + 1

    @property
    def sft_separator(self) -> int:
        return self.reserved_start + SFT_SEPARATOR_RESERVED_INDEX

    @property
    def text_start(self) -> int:
        return self.reserved_start + self.n_reserved

    @property
    def text_end(self) -> int:
        """One past the last text id: the text tokenizer has at most this many pieces."""
        return self.vocab_size - self.audio_ids

    @property
    def audio_ids(self) -> int:
        return self.audio_levels * self.audio_codebook_size

    @property
    def audio_code_start(self) -> int:
        return self.text_end

    @property
    def begin_of_audio(self) -> int:
        return self.reserved_start + BEGIN_OF_AUDIO_RESERVED_INDEX

    @property
    def end_of_audio(self) -> int:
        return self.reserved_start + END_OF_AUDIO_RESERVED_INDEX

    @property
    def begin_of_video(self) -> int:
        return self.reserved_start + BEGIN_OF_VIDEO_RESERVED_INDEX

    @property
    def end_of_video(self) -> int:
        return self.reserved_start + END_OF_VIDEO_RESERVED_INDEX

    @property
    def image_tokens(self) -> int:
        """Codes per image."""
        return self.image_grid * self.image_grid

    @property
    def image_block_length(self) -> int:
        """Ids an image takes in a sequence: begin marker, codes, end marker."""
        return self.image_tokens + 2

    def extends(self, old: VocabLayout) -> bool:
        """Whether this layout is `old` with audio codes appended after its last id: every old id
        keeps its meaning, so a model of `old` becomes one of this by growing its vocabulary rows."""
        without_audio = dataclasses.replace(self, vocab_size=self.text_end, audio_codebook_size=0, audio_levels=0)
        return self.audio_ids > 0 and old.audio_ids == 0 and without_audio == old

    # --- mappings ----------------------------------------------------------------------------
    def code_to_id(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.image_codebook_size):
            raise ValueError(
                f"image codes must lie in [0, {self.image_codebook_size}); got [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes.long() + IMAGE_CODE_OFFSET

    def id_to_code(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (ids.min() < self.image_code_start or ids.max() >= self.image_code_end):
            raise ValueError(
                f"image-code ids must lie in [{self.image_code_start}, {self.image_code_end}); "
                f"got [{int(ids.min())}, {int(ids.max())}]"
            )
        return ids.long() - IMAGE_CODE_OFFSET

    def audio_codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """[levels, frames] codes (EnCodec's order) -> ids frame by frame, each frame's levels in order."""
        if codes.dim() != 2 or codes.shape[0] != self.audio_levels:
            raise ValueError(f"audio codes must be [{self.audio_levels} levels, frames]; got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.audio_codebook_size):
            raise ValueError(
                f"audio codes must lie in [0, {self.audio_codebook_size}); got [{int(codes.min())}, {int(codes.max())}]"
            )
        level_offsets = torch.arange(self.audio_levels, device=codes.device).unsqueeze(1) * self.audio_codebook_size
        return (codes.long() + level_offsets + self.audio_code_start).T.flatten()

    def ids_to_audio_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Inverse of audio_codes_to_ids: whole frames of ids, each id of its position's level."""
        ids = ids.long()
        if ids.numel() % self.audio_levels:
            raise ValueError(f"{ids.numel()} audio ids are not whole frames of {self.audio_levels} levels")
        offsets = ids.view(-1, self.audio_levels).T - self.audio_code_start
        level_offsets = torch.arange(self.audio_levels, device=ids.device).unsqueeze(1) * self.audio_codebook_size
        codes = offsets - level_offsets
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.audio_codebook_size):
            raise ValueError("audio ids out of their positions' levels: not a valid audio segment")
        return codes

    def audio_level_range(self, level: int) -> tuple[int, int]:
        """The [start, end) ids of residual level `level`'s codes."""
        start = self.audio_code_start + level * self.audio_codebook_size
        return start, start + self.audio_codebook_size

    def id_ranges(self, modality: Modality) -> list[tuple[int, int]]:
        """The [start, end) id ranges of a modality (none: the layout does not have it)."""
        return {
            Modality.TEXT: [(self.text_start, self.text_end)],
            Modality.IMAGE: [(self.image_code_start, self.image_code_end)],
            Modality.SPECIAL: [(0, IMAGE_CODE_OFFSET), (self.image_code_end, self.text_start)],
            Modality.AUDIO: [(self.audio_code_start, self.vocab_size)] if self.audio_ids else [],
        }[modality]

    @property
    def modalities(self) -> list[Modality]:
        """The modalities this layout has ids for, in the vocabulary's order."""
        return [m for m in Modality if self.id_ranges(m)]

    def modality_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Modality of each id, elementwise, on the ids' device and without a host sync; an id
        outside the layout (-100, an ignored label) counts as special."""
        modality = torch.full_like(ids, int(Modality.SPECIAL), dtype=torch.long)
        for kind in Modality:
            for start, end in self.id_ranges(kind):
                modality = torch.where((ids >= start) & (ids < end), int(kind), modality)
        return modality

    def modality_mask(self, modality: Modality, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean mask over the whole vocabulary, True where an id is of `modality`."""
        return self.modality_of(torch.arange(self.vocab_size, device=device)) == int(modality)

    def control_token_names(self) -> list[str]:
        """Names of ids 4 .. text_start-1 in order, as Chameleon's vocabulary spells them: image
        codes, the two image markers, then `<reservedNNNNN>` with NNNNN = id - 4. The audio markers
        keep their reserved names (Chameleon's tokenizer has them); audio codes, after the text, are
        outside the text tokenizer's pieces altogether."""
        codes = [image_token_name(c) for c in range(self.image_codebook_size)]
        reserved = [f"<reserved{i - IMAGE_CODE_OFFSET:05d}>" for i in range(self.reserved_start, self.text_start)]
        return [*codes, END_OF_IMAGE_NAME, BEGIN_OF_IMAGE_NAME, *reserved]


IMAGE_TOKEN_PREFIX = "IMGIMG"
END_OF_IMAGE_NAME = "<eoss>"
BEGIN_OF_IMAGE_NAME = "<racm3:break>"
SPECIAL_NAMES = {BOS_ID: "<s>", PAD_ID: "<pad>", EOS_ID: "</s>", UNK_ID: "<unk>"}


def image_token_name(code: int) -> str:
    """Chameleon's vocabulary name of an image code: its digits spelled A-J, then 'Z'."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def image_code_of_name(name: str) -> int:
    return int("".join(str(ord(c) - ord("A")) for c in name[len(IMAGE_TOKEN_PREFIX) : -1]))


CHAMELEON_VOCAB = VocabLayout()  # the released sizes: 8,192 codes, 32 x 32 grid, 65,536 ids
