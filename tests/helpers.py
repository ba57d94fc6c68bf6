"""Shared test fixtures that are plain functions."""

import json
from collections import Counter
from pathlib import Path

import torch
import webdataset as wds
import yaml

from fusion_train.data.manifest import Manifest
from fusion_train.model.chameleon import Chameleon, ChameleonConfig
from fusion_train.vocab import VocabLayout

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "model"


def preset(name: str, **overrides) -> ChameleonConfig:
    return ChameleonConfig(**{**yaml.safe_load((PRESETS / f"{name}.yaml").read_text()), **overrides})


def small_config(**overrides) -> ChameleonConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=1024, max_seq_len=64)
    return ChameleonConfig(**{**base, **overrides})


def randomized_model(cfg: ChameleonConfig, seed: int = 0) -> Chameleon:
    """A model whose every parameter, norms and QK-norm biases included, is away from its init, so
    that a conversion mixing up any of them shows in the outputs."""
    torch.manual_seed(seed)
    model = Chameleon(cfg, seed=seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


# A small vocabulary with Chameleon's layout: 64 codes on a 4 x 4 grid, text ids from 586.
SMALL_VOCAB = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=2048, n_reserved=513)
# The same with 2 levels of 64 audio codes after the text: ids 2048..2175.
AUDIO_VOCAB = VocabLayout(image_codebook_size=64, image_grid=4, vocab_size=2048 + 128, n_reserved=513,
                          audio_codebook_size=64, audio_levels=2)  # fmt: skip


def english_documents(count: int | None = None) -> list[str]:
    """Real English prose that ships with CPython (the pydoc topic texts): no download needed."""
    from pydoc_data.topics import topics

    documents = [text for _, text in sorted(topics.items())]
    return documents[:count]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def numbered_documents(count: int, vocab: VocabLayout = SMALL_VOCAB, seed: int = 0, image_every: int = 0) -> list:
    """Documents whose 2nd and 3rd ids spell their number, so a test can tell which came out;
    random text of 3-60 ids, and an image block in every `image_every`-th one."""
    import numpy as np

    from fusion_train.tokenizers.multimodal import TokenizedDocument

    rng = np.random.default_rng(seed)
    text_ids = vocab.vocab_size - vocab.text_start
    documents = []
    for k in range(count):
        body = [vocab.text_start + k % text_ids, vocab.text_start + k // text_ids]
        body += list(rng.integers(vocab.text_start, vocab.vocab_size, rng.integers(3, 60)))
        if image_every and k % image_every == 0:
            codes = rng.integers(0, vocab.image_codebook_size, vocab.image_tokens) + vocab.image_code_start
            body += [
                vocab.begin_of_image,
                *codes,
                vocab.end_of_image,
                *rng.integers(vocab.text_start, vocab.vocab_size, 4),
            ]
        documents.append(TokenizedDocument(np.array([vocab.bos, *body, vocab.eos], dtype=np.int64)))
    return documents


def document_number(tokens, vocab: VocabLayout = SMALL_VOCAB) -> int:
    text_ids = vocab.vocab_size - vocab.text_start
    return int(tokens[1] - vocab.text_start) + text_ids * int(tokens[2] - vocab.text_start)


def write_shards(
    folder: Path, documents: list, vocab: VocabLayout = SMALL_VOCAB, per_shard: int = 50, fingerprints=None
):
    """Token shards + manifest written by the shard builder's own sink."""
    from data_pipelines.build import ShardSink
    from fusion_train.data.manifest import Manifest

    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(kind="text", vocab=vocab, fingerprints=fingerprints or {"text": "t0", "image": None})
    sink = ShardSink(folder, manifest, per_shard, 2**30)
    for i, document in enumerate(documents):
        sink.write((0, i), document)
    sink.close()
    manifest.write(folder)
    return folder


def shard_documents(folder) -> Counter:
    """The samples of a shard source as a multiset of (key, tokens bytes)."""
    found: Counter = Counter()
    for shard in Manifest.read(folder).shards:
        for sample in wds.WebDataset(str(Path(folder) / shard.name), shardshuffle=False):
            found[(sample["__key__"], sample["tokens.npy"])] += 1
    return found
