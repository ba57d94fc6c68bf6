"""What the monitors measure and how the divergence guard acts (the `monitor` config group), and the
prompts sampled during training (the `eval_samples` group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GUARD_ACTIONS = ("warn", "stop", "rollback")


@dataclass
class GuardConfig:
    enabled: bool = True
    action: str = "warn"  # warn: log and alert; stop: checkpoint and exit non-zero; rollback: PaLM's recipe
    min_history: int = 20  # steps of history before the spike and growth tests speak
    spike_window: int = 50  # steps of loss history for the robust z-score
    spike_zscore: float = 8.0  # (loss - median) / (1.4826 * MAD) above this is a spike
    norm_window: int = 100  # steps over which the trend of norms/final_out is fitted
    norm_growth_max: float = 1.0  # fitted relative growth of norms/final_out over norm_window (1.0: doubling)
    norm_start_step: int = 4000  # norms grow fast while a fresh model learns: the test starts here
    norm_jump_max: float = 20.0  # norms/final_out above this many times its least over norm_jump_steps
    norm_jump_steps: int = 5
    # Router collapse (model.experts): moe/load_max, the busiest expert's share of its group's routes,
    # above this for router_collapse_steps steps in a row (calibrated in docs/experts.md)
    router_collapse_max: float = 0.9
    router_collapse_steps: int = 20
    max_rollbacks: int = 3  # per run, counted across resumes; one more ends the run
    rollback_lr_factor: float = 1.0  # the LR is multiplied by this ...
    rollback_lr_steps: int = 0  # ... for this many steps after a rollback


@dataclass
class MonitorConfig:
    enabled: bool = True  # false: losses, LR, grad norm, data and throughput only (the overhead baseline)
    activations: bool = True  # norms/block_{i}_out, norms/final_out
    attention_logits: bool = True  # attn/qk_logit_max_{i}, on the first micro-batch of each logged step
    parameters: bool = True  # grad/norm_{group}, params/norm_{group}, optim/update_ratio_{group}
    peak_tflops: float = 989.0  # dense bf16 peak per device for perf/mfu: 989 H100 SXM, 312 A100
    guard: GuardConfig = field(default_factory=GuardConfig)
    # Observers of one's own, "package.module:Class" each, made with a RunInfo (observer.py); on
    # even when `enabled` is false. A metric of one's own: docs/architecture.md.
    observers: list[str] = field(default_factory=list)


@dataclass
class SamplesConfig:
    # {"prompt": [text or {"image": PATH}, ...], "mode": "text" | "image" | "interleaved"}, each
    prompts: list[Any] = field(default_factory=list)
    image_dir: str = "."  # where relative image paths in the prompts start
    chat: bool = False  # prompts end as SFT prompts do (for a fine-tuning run)
    max_new_tokens: int = 64  # text and interleaved prompts; an image-mode prompt gets its picture
    temperature: float = 0.0  # greedy by default: the same prompts give comparable outputs over training
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    guidance: bool = True  # Meta's three-stream guidance for image-mode prompts
    image_scale: float = 1.2
    text_scale: float = 3.0
    # The run's tokenizers; default: the paths its shard manifests record.
    text_tokenizer: str | None = None
    image_tokenizer: str | None = None
    audio_tokenizer: str | None = None
