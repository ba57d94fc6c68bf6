"""A run's plan from its config alone, before any GPU spins: parameters, FLOPs, batch, memory per
GPU by component, whether it fits and what to change first when it does not, and what the run
costs in time and GPU-hours at a stated MFU.

Model states follow DeepSpeed's own accounting (its `estimate_zero{2,3}_model_states_mem_needs`,
which the tests compare with): bytes per parameter of bf16 weights 2, bf16 gradients 2, fp32
gradients 4 and fp32 master weights plus Adam's two moments 12, each divided over the ranks from the
stage that partitions it; ZeRO-3 also gathers its largest module in fp32 (4 bytes per parameter),
and DeepSpeed counts 2 bytes for its fp32 gradient. Activations are counted from the tensors
autograd keeps for one block (bf16, the RMSNorms' fp32 copies, flash attention's log-sum-exp: no
seq² scores), which puts them within about 20%; the chunked loss adds its fp32 logits and their
gradient for one chunk; document masking through SDPA its dense [B, 1, T, T] boolean mask (flex's
block mask is T²/128² times smaller). Not counted: the CUDA context and allocator slack (keep a few
GB free).

Video sources (their manifests, where readable here) add what a video costs: tokens per time chunk
and per second at the shards' settings, the seconds a sequence holds, the sequences a sample spans.

Under sequence parallelism (trainer.sequence_parallel=N) each rank holds seq_len / N positions of a
sequence: activations and the loss's chunk are counted for those; the document mask stays the whole
sequence's (the attention kernel sees all of it); data parallelism is the GPUs / N. Each block's
attention exchanges q, k, v and its output all-to-all (DeepSpeed-Ulysses): each rank sends the
(N-1)/N of them that other ranks' heads need, 4 exchanges per block forward, 4 more in backward.

Under expert parallelism (trainer.expert_parallel=N) each GPU holds 1/N of each modality's experts;
each block's experts exchange every token's routes and their outputs all-to-all, 2 exchanges per
block forward, 2 more in backward.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fusion_train.data.manifest import DataError, Manifest
from fusion_train.model.chameleon import ChameleonConfig
from fusion_train.model.size import active_parameters, flops_per_token, largest_module_parameters, parameters_by_group
from fusion_train.tokenizers.audio import audio_config
from fusion_train.train.config import TrainConfig, bind_to_vocabulary, gradient_accumulation_steps
from fusion_train.train.expert_parallel import check_layout as check_expert_layout
from fusion_train.train.sequence_parallel import SequenceParallelError, check_layout

GB = 1e9
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0}  # dense bf16, the MFU denominators


def model_state_bytes(parameters: int, largest_module: int, stage: int, ranks: int) -> dict[str, float]:
    """Bytes per GPU of each part of the model states under ZeRO `stage` over `ranks`."""
    share = lambda bytes_per_parameter, from_stage: (  # noqa: E731
        bytes_per_parameter * parameters / (ranks if stage >= from_stage else 1)
    )
    if stage == 3:
        gradients = share(2, 2) + share(2, 1)  # bf16 partition + DeepSpeed's 2 bytes for the fp32 step
        gathered = 4 * largest_module
    else:
        gradients = share(2, 2) + share(4, 1)
        gathered = 0
    return {"weights_bf16": share(2, 3), "gradients": gradients, "master_and_adam_fp32": share(12, 1),
            "gathered_module": gathered}  # fmt: skip


def checkpoint_bytes(parameters: int, bf16: bool) -> int:
    """One checkpoint on disk: the module's weights (bf16, or fp32 where training is fp32) and the
    optimizer's fp32 master weights and Adam's two moments, written once over all ranks."""
    return parameters * ((2 if bf16 else 4) + 12)


def activation_bytes_per_token_and_layer(model: ChameleonConfig) -> int:
    h, kv, f = model.dim, model.n_kv_heads * model.head_dim, model.ffn_dim
    norms = 2 * (4 * h + 2 * h)  # two RMSNorms: fp32 input, bf16 output
    attention = 2 * (2 * (h + kv)) + 2 * (h + 2 * kv) + 2 * h + 4 * model.n_heads  # QK-norm, q k v, out, lse
    feed_forward = 2 * 4 * f  # w1 and w3 outputs, silu, their product
    dropout_masks = 2 * h if model.dropout > 0 else 0
    return norms + attention + feed_forward + dropout_masks


def tokens_per_rank(cfg: TrainConfig) -> int:
    """The positions of one micro-batch that one rank holds (seq_len / N of each sequence)."""
    return cfg.data.micro_batch_size * cfg.data.seq_len // cfg.trainer.sequence_parallel


def activation_bytes(cfg: TrainConfig, checkpointing: bool) -> float:
    """One micro-batch's activations kept for backward: every block's, or with activation
    checkpointing each block's input plus one block recomputed."""
    model, tokens = cfg.model, tokens_per_rank(cfg)
    block = activation_bytes_per_token_and_layer(model) * tokens
    if checkpointing:
        return model.n_layers * 2 * model.dim * tokens + block
    return model.n_layers * block + 2 * model.dim * tokens * 2  # + the embeddings and the final norm's input


def loss_bytes(cfg: TrainConfig) -> float:
    """The chunked loss's working set: one chunk's fp32 logits and their gradient."""
    chunk = min(cfg.model.loss_chunk_size, tokens_per_rank(cfg))
    return 2 * 4 * chunk * cfg.model.vocab_size


def attention_mask_bytes(cfg: TrainConfig) -> float:
    """SDPA's dense document mask, made once per forward and kept for backward."""
    dense = cfg.data.document_mask and cfg.model.attention == "sdpa"
    return cfg.data.micro_batch_size * cfg.data.seq_len**2 if dense else 0


def all_to_all_bytes_per_layer(cfg: TrainConfig) -> float:
    """What one rank sends in one block's forward under sequence parallelism: q and the output (all
    heads), k and v (their heads, or N copies when there are fewer), all but its own 1/N."""
    n, model = cfg.trainer.sequence_parallel, cfg.model
    if n == 1:
        return 0.0
    values_per_token = model.head_dim * (2 * model.n_heads + 2 * max(model.n_kv_heads, n))
    return 2 * values_per_token * tokens_per_rank(cfg) * (n - 1) / n  # bf16


def expert_parameters(model: ChameleonConfig) -> int:
    """The experts' weights (routers aside): what expert parallelism spreads over GPUs."""
    experts = model.experts_config
    return (
        model.n_layers * len(model.untied_copies) * experts.per_modality * 3 * model.dim * model.ffn_dim
        if experts
        else 0
    )


def expert_all_to_all_bytes_per_layer(cfg: TrainConfig) -> float:
    """What one rank sends in one block's forward under expert parallelism: each of its tokens'
    top_k routes to the expert's rank and the expert's output back, bf16; with balanced routers the
    (N-1)/N of them whose expert is elsewhere (fewer where capacity drops routes)."""
    n, model = cfg.trainer.expert_parallel, cfg.model
    if n == 1:
        return 0.0
    return 2 * 2 * model.dim * tokens_per_rank(cfg) * model.experts_config.top_k * (n - 1) / n


def memory(cfg: TrainConfig, ranks: int) -> dict[str, float]:
    """GB per GPU by component. Under expert parallelism (N) a GPU holds 1/N of the experts, whose
    optimizer states ZeRO partitions over the ranks / N holding the same ones."""
    groups, stage, n = parameters_by_group(cfg.model), cfg.deepspeed.zero_stage, cfg.trainer.expert_parallel
    experts = expert_parameters(cfg.model)
    dense = model_state_bytes(sum(groups.values()) - experts, largest_module_parameters(cfg.model), stage, ranks)
    spread = model_state_bytes(experts / n, 0, stage, ranks // n)
    states = {part: dense[part] + spread[part] for part in dense}
    buckets = 2 * (cfg.deepspeed.reduce_bucket_size + cfg.deepspeed.allgather_bucket_size)
    parts = {**states, "activations": activation_bytes(cfg, cfg.trainer.activation_checkpointing),
             "chunked_loss": loss_bytes(cfg), "attention_mask": attention_mask_bytes(cfg),
             "communication_buckets": buckets if cfg.deepspeed.zero_stage else 0}  # fmt: skip
    return {name: round(value / GB, 2) for name, value in parts.items()}


def _with(cfg: TrainConfig, setting: str, value) -> TrainConfig:
    group, name = setting.split(".")
    return dataclasses.replace(cfg, **{group: dataclasses.replace(getattr(cfg, group), **{name: value})})


def _fits(cfg: TrainConfig, ranks: int) -> bool:
    return sum(memory(cfg, ranks).values()) <= cfg.trainer.gpu_memory_gb


def first_change(cfg: TrainConfig, ranks: int) -> str:
    """The first setting, in order of what it costs in speed, whose change alone makes it fit; or
    all of them with the fewest sequence-parallel ranks, then the fewest GPUs, that would."""
    spread = cfg.trainer.expert_parallel > 1  # DeepSpeed's MoE layer refuses ZeRO-3
    candidates = [("deepspeed.zero_stage", stage) for stage in range(cfg.deepspeed.zero_stage + 1, 3 if spread else 4)]
    if widest_expert_parallel(cfg, ranks) > cfg.trainer.expert_parallel:
        candidates.append(("trainer.expert_parallel", widest_expert_parallel(cfg, ranks)))
    if attention_mask_bytes(cfg):
        candidates.append(("model.attention", "flex"))
    if not cfg.trainer.activation_checkpointing:
        candidates.append(("trainer.activation_checkpointing", True))
    if cfg.data.micro_batch_size > 1:
        candidates.append(("data.micro_batch_size", 1))
    for setting, value in candidates:
        if _fits(_with(cfg, setting, value), ranks):
            return f"{setting}={str(value).lower() if isinstance(value, bool) else value}"
    for setting, value in candidates:
        cfg = _with(cfg, setting, value)
    changed = ", ".join(f"{s}={str(v).lower() if isinstance(v, bool) else v}" for s, v in candidates)
    # Long sequences' activations shrink only by spreading each sequence over more GPUs.
    n = cfg.trainer.sequence_parallel
    for gpus in (ranks * 2**k for k in range(21)):
        for wider in (n * 2**k for k in range(11)):
            if not _layout_possible(cfg, wider, gpus):
                break
            if _fits(_with(cfg, "trainer.sequence_parallel", wider), gpus):
                spread = [f"trainer.sequence_parallel={wider}"] if wider != n else []
                settings = ", ".join([changed, *spread] if changed else spread) or "the settings as they are"
                return settings if gpus == ranks else f"more GPUs: {gpus} with {settings}"
    return "nothing: it does not fit on any number of these GPUs"


def widest_expert_parallel(cfg: TrainConfig, ranks: int) -> int:
    """The most GPUs each modality's experts can be spread over (1 without experts or under ZeRO-3)."""
    experts = cfg.model.experts_config
    if experts is None or cfg.deepspeed.zero_stage == 3:
        return 1
    return max(n for n in range(1, experts.per_modality + 1) if experts.per_modality % n == 0 and ranks % n == 0)


def _layout_possible(cfg: TrainConfig, sequence_parallel: int, gpus: int) -> bool:
    try:
        check_layout(sequence_parallel, gpus, cfg.model, {"data.seq_len": cfg.data.seq_len})
    except SequenceParallelError:
        return False
    return True


def make_plan(cfg: TrainConfig, ranks: int) -> dict:
    groups = parameters_by_group(cfg.model)
    n = cfg.trainer.sequence_parallel
    check_layout(n, ranks, cfg.model, {"data.seq_len": cfg.data.seq_len})
    check_expert_layout(cfg.trainer.expert_parallel, ranks, cfg.model, cfg.deepspeed)
    accumulation = gradient_accumulation_steps(cfg, ranks // n)
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    gpu = cfg.trainer.gpu
    if gpu not in PEAK_TFLOPS:
        raise ValueError(f"trainer.gpu={gpu!r}: choose one of {sorted(PEAK_TFLOPS)}")
    # Activation checkpointing runs each forward twice: 4/3 of the model's FLOPs at the same utilisation.
    recompute = 4 / 3 if cfg.trainer.activation_checkpointing else 1.0
    peak = ranks * PEAK_TFLOPS[gpu] * 1e12 * cfg.trainer.plan_mfu
    step_seconds = cfg.trainer.global_batch_tokens * per_token * recompute / peak
    parts = memory(cfg, ranks)
    total = round(sum(parts.values()), 2)
    fits = total <= cfg.trainer.gpu_memory_gb
    # All-to-alls per step: forward, backward, and the forward again under activation checkpointing.
    passes = (3 if cfg.trainer.activation_checkpointing else 2) * accumulation * cfg.model.n_layers
    return {
        "gpus": ranks, "gpu": gpu, "gpu_memory_gb": cfg.trainer.gpu_memory_gb, "zero_stage": cfg.deepspeed.zero_stage,
        "parameters": sum(groups.values()), "parameters_by_group": groups,
        "active_parameters_per_token": active_parameters(cfg.model), "flops_per_token": per_token,
        "tokens_per_step": cfg.trainer.global_batch_tokens, "micro_batch_size": cfg.data.micro_batch_size,
        "seq_len": cfg.data.seq_len, "gradient_accumulation_steps": accumulation,
        "sequence_parallel": n, "data_parallel": ranks // n, "tokens_per_gpu": tokens_per_rank(cfg),
        "all_to_all_gb_per_layer": round(all_to_all_bytes_per_layer(cfg) / GB, 3),
        "all_to_all_gb_per_step": round(all_to_all_bytes_per_layer(cfg) * passes / GB, 1),
        "expert_parallel": cfg.trainer.expert_parallel, "expert_parameters": expert_parameters(cfg.model),
        "expert_all_to_all_gb_per_layer": round(expert_all_to_all_bytes_per_layer(cfg) / GB, 3),
        "expert_all_to_all_gb_per_step": round(expert_all_to_all_bytes_per_layer(cfg) * passes / GB, 1),
        "activation_checkpointing": cfg.trainer.activation_checkpointing,
        "memory_gb_per_gpu": parts, "memory_gb_per_gpu_total": total,
        "checkpoint_gb": round(checkpoint_bytes(sum(groups.values()), cfg.deepspeed.bf16) / GB, 2),
        "activations_gb_per_micro_batch": {
            "without_checkpointing": round(activation_bytes(cfg, False) / GB, 2),
            "with_checkpointing": round(activation_bytes(cfg, True) / GB, 2),
        },
        "fits": fits, "first_change": None if fits else first_change(cfg, ranks),
        "mfu": cfg.trainer.plan_mfu, "seconds_per_step": round(step_seconds, 2), "steps": cfg.trainer.steps,
        "gpu_hours": round(step_seconds * cfg.trainer.steps * ranks / 3600, 1),
    }  # fmt: skip


def render(plan: dict) -> str:
    memory_lines = "\n".join(f"  {name:<22} {gb:8.2f} GB" for name, gb in plan["memory_gb_per_gpu"].items())
    verdict = "fits" if plan["fits"] else f"does NOT fit: change first {plan['first_change']}"
    return (
        f"{plan['parameters'] / 1e9:.2f}B parameters ({', '.join(f'{g} {n / 1e9:.2f}B' for g, n in plan['parameters_by_group'].items())})\n"
        f"{plan['active_parameters_per_token'] / 1e9:.2f}B of them (embeddings aside) used by each token; "
        f"{plan['flops_per_token'] / 1e9:.1f} GFLOP per token; {plan['tokens_per_step']:,} tokens per step = "
        f"{plan['micro_batch_size']} x {plan['seq_len']} tokens x {plan['data_parallel']} data-parallel ranks x "
        f"{plan['gradient_accumulation_steps']} micro-steps\n{sequence_line(plan)}{expert_line(plan)}{video_lines(plan)}"
        f"memory per GPU, ZeRO-{plan['zero_stage']}, activation checkpointing {'on' if plan['activation_checkpointing'] else 'off'}:\n"
        f"{memory_lines}\n  {'total':<22} {plan['memory_gb_per_gpu_total']:8.2f} GB of {plan['gpu_memory_gb']:g}: {verdict}\n"
        f"one checkpoint: {plan['checkpoint_gb']:,.2f} GB on disk (weights, fp32 master weights and Adam's moments)\n"
        f"at {plan['mfu']:.0%} MFU on {plan['gpus']} {plan['gpu'].upper()}: {plan['seconds_per_step']:.2f} s per step, "
        f"{plan['gpu_hours']:,.0f} GPU-hours for {plan['steps']:,} steps"
    )  # fmt: skip


def sequence_line(plan: dict) -> str:
    if plan["sequence_parallel"] == 1:
        return ""
    return (f"sequence parallelism: {plan['sequence_parallel']} GPUs per sequence, {plan['tokens_per_gpu']:,} tokens "
            f"each; all-to-all {plan['all_to_all_gb_per_layer']:.3f} GB sent per GPU per block forward, "
            f"{plan['all_to_all_gb_per_step']:,.1f} GB per step\n")  # fmt: skip


def expert_line(plan: dict) -> str:
    if not plan["expert_parameters"]:
        return ""
    n = plan["expert_parallel"]
    where = "on every GPU" if n == 1 else f"spread over {n} GPUs ({plan['expert_parameters'] / n / 1e9:.2f}B on each)"
    exchange = (
        ""
        if n == 1
        else (
            f"; all-to-all {plan['expert_all_to_all_gb_per_layer']:.3f} GB sent per GPU per block forward (balanced "
            f"routes), {plan['expert_all_to_all_gb_per_step']:,.1f} GB per step"
        )
    )
    return f"experts: {plan['expert_parameters'] / 1e9:.2f}B parameters {where}{exchange}\n"


def bind_to_shards_here(cfg: TrainConfig) -> None:
    """Give the model config the shards' vocabulary (an untied model's copies per modality) when a
    source's manifest is readable here; a plan is often made where the shards are not."""
    for source in cfg.data.sources.values():
        try:
            vocab = Manifest.read(source.path).vocab
        except DataError:
            continue
        bind_to_vocabulary(cfg.model, vocab)
        return


def video_lengths(cfg: TrainConfig) -> list[dict]:
    """For each training source with videos whose manifest is readable here: what a time chunk (a
    frame and its sound) costs at the shards' settings, the seconds of video a sequence holds, how
    many sequences a sample spans, and whether a chunk fits data.seq_len at all."""
    lengths = []
    for name, source in cfg.data.sources.items():
        try:
            manifest = Manifest.read(source.path)
        except DataError:
            continue
        if not manifest.videos.get("videos"):
            continue
        fps = manifest.options.get("video_fps", 1.0)
        audio = manifest.tokenizer_paths.get("audio")
        with_sound = audio and manifest.videos["without_sound"] < manifest.videos["videos"]
        sound = 2 + manifest.vocab.audio_levels * round(audio_config(audio).frame_rate / fps) if with_sound else 0
        chunk = manifest.vocab.image_block_length + sound
        per_sample = sum(manifest.tokens_by_modality.values()) / manifest.samples
        lengths.append({
            "source": name, "frames_per_second": fps, "chunk_tokens": chunk, "tokens_per_second_of_video": chunk * fps,
            "frames_per_video": round(manifest.videos["frames"] / manifest.videos["videos"], 1),
            "seconds_per_sequence": round(cfg.data.seq_len / (chunk * fps), 2),
            "tokens_per_sample": round(per_sample), "sequences_per_sample": round(per_sample / cfg.data.seq_len, 2),
            "chunk_fits": chunk <= cfg.data.seq_len,
        })  # fmt: skip
    return lengths


def video_lines(plan: dict) -> str:
    lines = []
    for v in plan.get("videos", []):
        fit = "" if v["chunk_fits"] else (f" A CHUNK DOES NOT FIT data.seq_len={plan['seq_len']}: raise it (sequence "
                                          "parallelism makes room) or rebuild at a higher --video-fps")  # fmt: skip
        lines.append(
            f"video source {v['source']}: {v['frames_per_second']:g} fps, a chunk (frame and its sound) "
            f"{v['chunk_tokens']:,} tokens = {v['tokens_per_second_of_video']:,.0f} tokens a second of video; a "
            f"sequence holds {v['seconds_per_sequence']:g} s; its samples average {v['tokens_per_sample']:,} tokens "
            f"({v['sequences_per_sample']:g} sequences, {v['frames_per_video']:g} frames a video).{fit}\n"
        )
    return "".join(lines)


def write_plan(plan: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "plan.json"
    path.write_text(json.dumps(plan, indent=2) + "\n")
    return path
