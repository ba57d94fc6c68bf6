"""Generation: the KV cache against full recompute, the modality constraints, sampling and guidance."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_train.generate.constraints import ModalityConstraints, Mode, VideoPlan, text_ids, video_script
from fusion_train.generate.generator import Generator, Request
from fusion_train.generate.guidance import Guidance, combine, guidance_prompts
from fusion_train.generate.sampling import Sampling, filter_top_k_top_p
from fusion_train.tokenizers.video import parse_video_block
from fusion_train.vocab import Modality
from helpers import AUDIO_VOCAB, randomized_model, small_config

VOCAB = AUDIO_VOCAB  # 64 codes on a 4 x 4 grid (an image block is 18 ids); 2 levels of 64 audio codes


def _model(block_style: str, n_kv_heads: int = 2):
    cfg = small_config(vocab_size=VOCAB.vocab_size, max_seq_len=128, block_style=block_style, n_kv_heads=n_kv_heads)
    return randomized_model(cfg)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [VOCAB.bos, *torch.randint(VOCAB.text_start, VOCAB.vocab_size, (n,), generator=g).tolist()] for n in lengths
    ]


def _reference(model, prompt: list[int], mode: Mode, max_new_tokens: int) -> list[int]:
    """Greedy decoding by the training forward over the whole sequence for every token, one prompt alone."""
    constraints = ModalityConstraints(VOCAB, [mode], [max_new_tokens])
    sequence, generated = list(prompt), []
    while not constraints.done:
        with torch.no_grad():
            logits = model(torch.tensor([sequence]))[:, -1]
        token = constraints.mask(logits).argmax(-1)
        constraints.advance(token)
        generated.append(int(token))
        sequence.append(int(token))
    return generated


@pytest.mark.parametrize("block_style", ["prenorm", "swin"])
def test_kv_cache_generation_equals_full_recompute_for_batched_prompts_of_different_lengths(block_style):
    model = _model(block_style)  # GQA: 4 heads, 2 key/value heads
    prompts = _prompts([2, 11, 6, 7])
    modes = [Mode.TEXT, Mode.INTERLEAVED, Mode.IMAGE, Mode.INTERLEAVED]
    prompts[2].append(VOCAB.begin_of_image)
    # Favour image codes in one interleaved row's start so that blocks open mid-text and close.
    with torch.no_grad():
        model.output.weight[VOCAB.begin_of_image] += 0.6 * model.norm.weight.sign()
    requests = [Request(p, m) for p, m in zip(prompts, modes, strict=True)]
    cached = Generator(model, VOCAB).generate(requests, Sampling(), max_new_tokens=40)
    recomputed = Generator(model, VOCAB, use_cache=False).generate(requests, Sampling(), max_new_tokens=40)
    for request, with_cache, without in zip(requests, cached, recomputed, strict=True):
        alone = _reference(model, request.prompt, request.mode, 40)
        assert with_cache.tokens == without.tokens == alone
    assert any(VOCAB.begin_of_image in g.tokens for g in cached)  # the test saw an image open in text
    assert cached[2].stop == "image_done" and len(cached[2].tokens) == VOCAB.image_tokens + 1


def _forbidden_report(mode: Mode, tokens: list[int]) -> str | None:
    """What is wrong with a generated sequence under `mode`, or None."""
    v, text = VOCAB, text_ids(VOCAB)
    in_image, in_audio, codes = mode == Mode.IMAGE, mode == Mode.AUDIO, 0
    for position, token in enumerate(tokens):
        if in_audio:
            if token == v.end_of_audio and codes and codes % v.audio_levels == 0:
                in_audio, codes = False, 0
                if mode == Mode.AUDIO:
                    return None if position == len(tokens) - 1 else "tokens after the audio-mode clip"
            elif (
                not v.audio_level_range(codes % v.audio_levels)[0]
                <= token
                < v.audio_level_range(codes % v.audio_levels)[1]
            ):
                return f"position {position}: {token} is not a level-{codes % v.audio_levels} code"
            else:
                codes += 1
        elif in_image:
            if codes < v.image_tokens:
                if not v.image_code_start <= token < v.image_code_end:
                    return f"position {position}: {token} inside an image after {codes} codes"
                codes += 1
            elif token != v.end_of_image:
                return f"position {position}: {token} where <eoss> must close the image"
            else:
                in_image, codes = False, 0
                if mode == Mode.IMAGE:
                    return None if position == len(tokens) - 1 else "tokens after the image-mode image"
        elif token == v.begin_of_image and mode == Mode.INTERLEAVED:
            in_image = True
        elif token == v.begin_of_audio and mode == Mode.INTERLEAVED:
            in_audio = True
        elif not text[token]:
            return f"position {position}: {token} is not a text id ({mode})"
    return "an image left open" if in_image else "a clip left open" if in_audio else None


@settings(max_examples=60, deadline=None)
@given(
    modes=st.lists(st.sampled_from([m for m in Mode if m != Mode.VIDEO]), min_size=1, max_size=4),
    budget=st.integers(min_value=VOCAB.image_tokens + 1, max_value=80),
    seed=st.integers(min_value=0, max_value=2**31),
    image_bias=st.floats(min_value=0.0, max_value=8.0),
)
def test_constrained_decoding_never_emits_a_forbidden_id(modes, budget, seed, image_bias):
    """Random logits at every step, biased towards the markers to open many image and audio blocks."""
    g = torch.Generator().manual_seed(seed)
    constraints = ModalityConstraints(VOCAB, modes, [budget] * len(modes))
    generated = [[] for _ in modes]
    bias = torch.zeros(VOCAB.vocab_size)
    bias[VOCAB.modality_mask(Modality.SPECIAL)] = image_bias
    while not constraints.done:
        logits = torch.randn(len(modes), VOCAB.vocab_size, generator=g) * 4 + bias
        tokens = torch.multinomial(constraints.mask(logits).softmax(-1), 1, generator=g).squeeze(-1)
        for row in constraints.advance(tokens).nonzero().flatten().tolist():
            generated[row].append(int(tokens[row]))
    for mode, tokens in zip(modes, generated, strict=True):
        assert len(tokens) <= budget
        assert _forbidden_report(Mode(mode), tokens) is None, (mode, tokens)
        if mode == Mode.IMAGE:
            assert len(tokens) == VOCAB.image_tokens + 1 and tokens[-1] == VOCAB.end_of_image
        if mode == Mode.AUDIO:
            assert tokens[-1] == VOCAB.end_of_audio and (len(tokens) - 1) % VOCAB.audio_levels == 0


@pytest.mark.parametrize("clip_codes", [3, 0])
def test_video_mode_makes_its_frames_and_sound_in_the_layout_beside_free_rows(clip_codes):
    """Random logits biased towards every marker: a video row still makes exactly its frames, each an
    image block then (with sound) a clip of `clip_codes` audio frames with each position's level, and
    ends with <end-video>; a text row beside it is unaffected."""
    g = torch.Generator().manual_seed(clip_codes)
    plan = VideoPlan(frames=2, clip_codes=clip_codes)
    script = video_script(VOCAB, plan)
    constraints = ModalityConstraints(VOCAB, [Mode.VIDEO, Mode.TEXT], [len(script), 30], scripts=[script, None])
    generated = [[], []]
    bias = torch.zeros(VOCAB.vocab_size)
    bias[VOCAB.modality_mask(Modality.SPECIAL)] = 6.0
    while not constraints.done:
        tokens = torch.multinomial(constraints.mask(torch.randn(2, VOCAB.vocab_size, generator=g) * 4 + bias).softmax(-1),
                                   1, generator=g).squeeze(-1)  # fmt: skip
        for row in constraints.advance(tokens).nonzero().flatten().tolist():
            generated[row].append(int(tokens[row]))
    video, text = generated
    assert len(video) == len(script) and video[-1] == VOCAB.end_of_video
    _, frames, clips = parse_video_block([VOCAB.begin_of_video, *video], VOCAB)
    assert len(frames) == 2 and [c.shape for c in clips] == [(VOCAB.audio_levels, clip_codes)] * (
        2 if clip_codes else 0
    )
    assert _forbidden_report(Mode.TEXT, text) is None
    with pytest.raises(ValueError, match="video mode: row 0 has no video_script"):
        ModalityConstraints(VOCAB, [Mode.VIDEO], [10])


def test_generation_stops_at_end_of_sequence_and_end_of_turn():
    model = _model("prenorm")
    for stop_id, reason in ((VOCAB.eos, "end_of_sequence"), (VOCAB.sft_separator, "end_of_turn")):
        with torch.no_grad():
            model.output.weight[stop_id] = 5 * model.output.weight.abs().max() * model.norm.weight.sign()
        [generation] = Generator(model, VOCAB).generate([Request(_prompts([4])[0])], Sampling(), 30)
        assert generation.tokens[-1] == stop_id and generation.stop == reason
        with torch.no_grad():
            model.output.weight[stop_id] = 0


def test_bad_prompts_are_clear_errors():
    generator = Generator(_model("prenorm"), VOCAB)
    with pytest.raises(ValueError, match="prompt 1 has 128 tokens: the model's context is 128"):
        generator.generate([Request([0, 700]), Request([0] * 128)], Sampling(), 4)
    with pytest.raises(ValueError, match="image mode needs room for 16 codes"):
        generator.generate([Request([0] * 120 + [VOCAB.begin_of_image], Mode.IMAGE)], Sampling(), 8)
    with pytest.raises(ValueError, match="audio mode needs room for a frame of 2 codes and <end-audio>"):
        generator.generate([Request([0, 700, VOCAB.begin_of_audio], Mode.AUDIO)], Sampling(), 2)
    with pytest.raises(ValueError, match="prompt 0 must start with <s>"):
        generator.generate([Request([700])], Sampling(), 4)


def test_sampling_is_seeded_and_its_filters_keep_the_right_ids():
    model = _model("prenorm")
    request = [Request(p) for p in _prompts([3, 5])]
    sample = lambda seed: Generator(model, VOCAB).generate(request, Sampling(1.0, 0.9, 50, seed), 12)  # noqa: E731
    assert [g.tokens for g in sample(7)] == [g.tokens for g in sample(7)]
    assert [g.tokens for g in sample(7)] != [g.tokens for g in sample(8)]
    greedy = Generator(model, VOCAB).generate(request, Sampling(), 12)
    top_one = Generator(model, VOCAB).generate(request, Sampling(1.0, top_k=1, seed=3), 12)
    assert [g.tokens for g in greedy] == [g.tokens for g in top_one]

    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_top_k_top_p(logits, 2, 1.0)) == [True, True, False, False, False]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: the nucleus of 0.85 is the first two
    assert probs[:2].sum() > 0.85 > probs[0]
    assert kept(filter_top_k_top_p(logits, 0, 0.85)) == [True, True, False, False, False]
    assert kept(filter_top_k_top_p(logits, 0, 0.5)) == [True, False, False, False, False]


def test_guidance_combines_the_three_streams_by_the_formula():
    full, image_only, unconditional = torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 2.0]]), torch.tensor([[1.0, 0.5]])
    streams = torch.cat([full, image_only, unconditional])
    # u + 1.2 (img - u) + 3 (full - img): [1 + 1.2 + 3, 0.5 + 1.8 - 3]
    assert torch.allclose(combine(streams, Guidance()), torch.tensor([[5.2, -0.7]]))
    assert torch.allclose(combine(streams, Guidance(1.0, 1.0)), full)

    image = [VOCAB.begin_of_image, *range(4, 4 + VOCAB.image_tokens), VOCAB.end_of_image]
    prompt = [VOCAB.bos, 700, *image, 701, VOCAB.sft_separator, VOCAB.begin_of_image]
    chat = [VOCAB.sft_separator, VOCAB.begin_of_image]
    assert guidance_prompts(prompt, VOCAB) == [prompt, [VOCAB.bos, *image, *chat], [VOCAB.bos, *chat]]
    plain = [VOCAB.bos, *image, 701, VOCAB.begin_of_image]
    assert guidance_prompts(plain, VOCAB) == [
        plain,
        [VOCAB.bos, *image, VOCAB.begin_of_image],
        [VOCAB.bos, VOCAB.begin_of_image],
    ]


def test_guidance_at_scales_one_gives_the_conditional_image():
    model = _model("swin")
    prompt = [*_prompts([5])[0], VOCAB.begin_of_image]
    requests = [Request(prompt, Mode.IMAGE), Request(_prompts([3], seed=1)[0], Mode.TEXT)]
    plain = Generator(model, VOCAB).generate(requests, Sampling(), 20)
    guided = Generator(model, VOCAB).generate(requests, Sampling(), 20, Guidance(1.0, 1.0))
    assert [g.tokens for g in guided] == [g.tokens for g in plain]
    strong = Generator(model, VOCAB).generate(requests, Sampling(), 20, Guidance(1.2, 3.0))
    assert strong[0].tokens != plain[0].tokens and strong[1].tokens == plain[1].tokens
