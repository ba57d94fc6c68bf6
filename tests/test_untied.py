"""Modality-untied blocks (Mixture-of-Transformers): the routed model against the dense one and
against a naive reference that runs both copies on every token."""

import json

import numpy as np
import pytest
import torch

from conftest import read_metrics, torchrun, train_overrides
from fusion_train.commands.convert import main as convert_main
from fusion_train.commands.generate import main as generate_main
from fusion_train.lab.untied import Arm, comparison_rows
from fusion_train.model.chameleon import (
    UNTIED_PARTS,
    ByModality,
    Chameleon,
    ModalityRouting,
    dense_parameter_name,
)
from fusion_train.model.formats import ConversionError
from fusion_train.model.formats.hf import to_hf_state_dict
from fusion_train.model.formats.meta import to_meta_shards
from fusion_train.model.formats.native import load_native
from fusion_train.model.kv_cache import KVCache
from fusion_train.model.size import flops_per_token, parameter_counts
from helpers import randomized_model, small_config

TRAIN = "-m fusion_train.train"
IMAGE_IDS = [4, 68]  # small_config's vocabulary of 1,024 ids: 64 image codes from id 4
AUDIO_IDS = [960, 1024]  # and, in a layout with audio, 64 audio codes at the end


def untied_config(parts=UNTIED_PARTS, audio: bool = False, **overrides):
    return small_config(untie_modalities=list(parts), image_token_ids=IMAGE_IDS,
                        audio_token_ids=AUDIO_IDS if audio else None, **overrides)  # fmt: skip


def mixed_ids(batch: int = 3, seq_len: int = 40, seed: int = 0, audio: bool = False) -> torch.Tensor:
    """Text, then an image, then text again (with an audio clip in it), at a different place in each row."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMAGE_IDS[1], AUDIO_IDS[0], (batch, seq_len), generator=generator)
    for row in range(batch):
        start = 3 + 7 * row
        ids[row, start : start + 16] = torch.randint(*IMAGE_IDS, (16,), generator=generator)
        if audio:
            ids[row, start + 17 : start + 22] = torch.randint(*AUDIO_IDS, (5,), generator=generator)
    return ids


def untied_copy_of(dense: Chameleon, parts=UNTIED_PARTS, **overrides) -> Chameleon:
    """An untied model whose every copy holds the dense model's weights."""
    untied = Chameleon(untied_config(parts, **overrides)).eval()
    dense_weights = dict(dense.named_parameters())
    with torch.no_grad():
        for name, param in untied.named_parameters():
            param.copy_(dense_weights[dense_parameter_name(name)])
    return untied


@pytest.mark.parametrize("parts", [["ffn"], ["attention", "qk_norm"], list(UNTIED_PARTS)])
def test_parameters_grow_by_the_untied_parts_and_flops_per_token_do_not(parts):
    cfg, dense = untied_config(parts), small_config()
    assert parameter_counts(cfg).total == sum(p.numel() for p in Chameleon(cfg).parameters())
    copied = sum(p.numel() for n, p in Chameleon(cfg).named_parameters() if ".image." in n)
    assert parameter_counts(cfg).total == parameter_counts(dense).total + copied and copied > 0
    assert flops_per_token(cfg, 64) == flops_per_token(dense, 64)


@pytest.mark.parametrize("block_style, audio", [("prenorm", False), ("swin", False), ("prenorm", True)],
                         ids=["prenorm", "swin", "three modalities"])  # fmt: skip
def test_copies_of_the_dense_weights_give_the_dense_logits_and_gradients(block_style, audio):
    dense = randomized_model(small_config(block_style=block_style))
    untied = untied_copy_of(dense, block_style=block_style, audio=audio)
    assert (".audio." in "".join(n for n, _ in untied.named_parameters())) == audio
    ids = mixed_ids(audio=audio)
    dense_logits, untied_logits = dense(ids), untied(ids)
    torch.testing.assert_close(untied_logits, dense_logits, rtol=1e-5, atol=1e-5)
    (dense_logits.square().mean()).backward()
    (untied_logits.square().mean()).backward()
    summed = {}
    for name, param in untied.named_parameters():
        key = dense_parameter_name(name)
        summed[key] = summed.get(key, 0) + param.grad
    for name, param in dense.named_parameters():
        torch.testing.assert_close(summed[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_token_goes_only_through_its_own_modalitys_copy():
    model = randomized_model(untied_config())
    text_only = torch.randint(IMAGE_IDS[1], 1024, (2, 24))
    mixed = mixed_ids(2, 40)
    with torch.no_grad():
        before = model(text_only), model(mixed)
        for name, param in model.named_parameters():
            if ".image." in name:
                param.add_(torch.randn_like(param))
        after = model(text_only), model(mixed)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    # In a mixed sequence the text after the image sees the image's keys and values: it changes;
    # the text before it does not.
    assert torch.equal(after[1][0, :3], before[1][0, :3])
    assert not torch.allclose(after[1][0, 20:], before[1][0, 20:])


class NaiveRouting:
    """Sequence order kept, each token's copy number remembered: the reference the routing must equal."""

    def __init__(self, ids: torch.Tensor, ranges: list[list[int]]):
        self.copy = torch.zeros_like(ids)
        for number, (start, end) in enumerate(ranges, start=1):
            self.copy[(ids >= start) & (ids < end)] = number

    @staticmethod
    def group(x):
        return x

    ungroup = group


def every_copy_then_select(self, x, routing):
    copy = routing.copy.reshape(*routing.copy.shape, *[1] * (x.dim() - 2))
    outputs = [getattr(self, name)(x) for name in self.copies]
    return sum(torch.where(copy == number, out, 0) for number, out in enumerate(outputs))


@pytest.mark.parametrize("block_style", ["prenorm", "swin"])
@pytest.mark.parametrize("rows", ["mixed", "text only", "image only", "three modalities"])
def test_routing_equals_running_every_copy_on_every_token(block_style, rows, monkeypatch):
    audio = rows == "three modalities"
    model = randomized_model(untied_config(block_style=block_style, audio=audio))  # GQA: 4 heads, 2 kv heads
    ids = {
        "mixed": mixed_ids(seed=1),
        "text only": torch.randint(IMAGE_IDS[1], 1024, (2, 16)),
        "image only": torch.randint(*IMAGE_IDS, (2, 16)),
        "three modalities": mixed_ids(seed=1, audio=True),
    }[rows]
    with torch.no_grad():
        routed = model(ids)
        monkeypatch.setattr(ByModality, "forward", every_copy_then_select)
        monkeypatch.setattr(ModalityRouting, "of", classmethod(lambda cls, i, r: NaiveRouting(i, r)))
        reference = model(ids)
    torch.testing.assert_close(routed, reference, rtol=1e-5, atol=1e-5)


def test_decoding_with_the_kv_cache_equals_the_whole_forward():
    model = randomized_model(untied_config())
    ids = mixed_ids(2, 32, seed=2)
    with torch.no_grad():
        whole = model(ids)
        cache = KVCache.for_model(model.cfg, batch=2, capacity=32, device=torch.device("cpu"), dtype=torch.float32)
        steps = [model.decode(ids[:, :10], cache)] + [model.decode(ids[:, t : t + 1], cache) for t in range(10, 32)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"untie_modalities": ["mlp"], "image_token_ids": IMAGE_IDS}, "choose among"),
        ({"untie_modalities": ["ffn"], "image_token_ids": [4]}, "image_token_ids must be"),
        ({"untie_modalities": ["qk_norm"], "image_token_ids": IMAGE_IDS, "qk_norm": False}, "qk_norm is off"),
    ],
)
def test_bad_untie_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_an_untied_model_needs_its_image_ids_and_has_no_hf_or_meta_form():
    with pytest.raises(ValueError, match="needs model.image_token_ids"):
        Chameleon(small_config(untie_modalities=["ffn"]))
    model = Chameleon(untied_config(["ffn"]))
    with pytest.raises(ConversionError, match="untie_modalities=\\['ffn'\\]: Hugging Face's Chameleon has one set"):
        to_hf_state_dict(model.state_dict(), model.cfg)
    with pytest.raises(ConversionError, match="Meta's Chameleon checkpoint has one set of weights per block"):
        to_meta_shards(model.state_dict(), model.cfg, 1)


UNTIE_ALL = "model.untie_modalities=[attention,ffn,norms,qk_norm]"


def test_an_untied_model_under_zero3_resumes_exactly_consolidates_and_generates(demo_data, tmp_path):
    """Two ranks under ZeRO-3: a run stopped at step 2 and resumed ends as the straight run does;
    its checkpoint consolidates into a model folder, and generates the same with and without the KV
    cache."""
    common = ["deepspeed=zero3", "trainer.steps=4", "trainer.checkpoint_every=2", "logging.log_every=1", UNTIE_ALL]
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(TRAIN, *train_overrides(demo_data, straight, *common))
    torchrun(TRAIN, *train_overrides(demo_data, split, *common, "trainer.stop_after_steps=2"))
    torchrun(TRAIN, *train_overrides(demo_data, split, *common))
    rows = {run: {m["step"]: m for m in read_metrics(run) if "loss/total" in m} for run in (straight, split)}
    assert [m["loss/total"] for m in rows[split].values()] == [m["loss/total"] for m in rows[straight].values()]
    assert {"norms/block_1_out_text", "norms/block_1_out_image"} <= set(rows[straight][4])

    model_dir = tmp_path / "model"
    assert convert_main(["zero-to-safetensors", str(straight / "checkpoints" / "step_4"), str(model_dir)]) == 0
    _, cfg, vocab = load_native(model_dir)
    assert cfg.untie_modalities == ["attention", "ffn", "norms", "qk_norm"]
    assert cfg.image_token_ids == [vocab.image_code_start, vocab.image_code_end]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": ["A photo of"], "mode": "text"}) + "\n"
        + json.dumps({"prompt": ["a red square"], "mode": "image"}) + "\n"
    )  # fmt: skip
    outputs = []
    for cache in ([], ["--no-cache"]):
        out = tmp_path / f"generated{len(cache)}"
        args = [str(straight / "checkpoints" / "step_4"), "--prompts", str(prompts), "--greedy", "--max-new-tokens",
                "12", "--out", str(out)]  # fmt: skip
        assert generate_main([*args, *cache]) == 0
        rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
        picture = (out / rows[1]["output"][0]["image"]).read_bytes()
        outputs.append((rows, picture))
    assert outputs[0] == outputs[1] and outputs[0][0][1]["stop"] == "image_done"


def test_the_comparison_finds_the_share_of_the_dense_steps_an_arm_needs():
    steps = np.array([25, 50, 75, 100])
    dense = Arm(
        "dense", 100, 1e9, steps, {"text": np.array([5, 4, 3.5, 3.0]), "image": np.array([7, 6, 5.5, 5.0])}, 0.2
    )
    untied = Arm(
        "all", 180, 1e9, steps, {"text": np.array([4.5, 3.0, 2.8, 2.7]), "image": np.array([7, 6, 5.8, 5.6])}, 0.3
    )
    rows = {r["arm"]: r for r in comparison_rows([dense, untied])}
    assert (
        rows["all"]["steps to dense text loss"] == "50 (50%)" and rows["all"]["wall-clock to dense text loss"] == "75%"
    )
    assert rows["all"]["steps to dense image loss"] == "not reached"
    assert rows["dense"]["steps to dense text loss"] == "100 (100%)"
