"""The data presets in conf/data compose with Hydra into valid loader configs."""

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion_train.data.loader import DataConfig, SourceConfig
from helpers import PRESETS


def data_config(name: str) -> DataConfig:
    with initialize_config_dir(config_dir=str(PRESETS.parent / "data"), version_base="1.3"):
        raw = OmegaConf.to_container(compose(config_name=name), resolve=True)
    raw["sources"] = {n: SourceConfig(**s) for n, s in raw["sources"].items()}
    return DataConfig(**raw)


def test_stage_two_halves_stage_one_and_adds_sources():
    stage1, stage2 = data_config("chameleon_stage1"), data_config("chameleon_stage2")
    assert list(stage1.sources) == ["text", "image_text", "interleaved"]
    assert stage1.mixture_unit == "tokens" and stage1.seq_len == 4096
    assert set(stage2.sources) == set(stage1.sources) | {"high_quality", "instruction"}
    assert stage2.reweight == {name: 0.5 for name in stage1.sources}
    assert stage2.sources["text"] == stage1.sources["text"]
