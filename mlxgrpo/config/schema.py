"""The configuration schema: one frozen dataclass per TOML section, every field with a help line.

Field metadata keys: `help` (one line), `choices` (allowed values), `min`/`max` (inclusive
bounds), `gt` (exclusive lower bound), `path_component` (one directory name, not a path). The
resolver and `config show` read them; nothing here imports mlx, so config tooling works anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlxgrpo.config.choices import (
    ADVANTAGE_ESTIMATORS,
    IMPORTANCE_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    REWARD_AGGREGATIONS,
    ROLLOUT_CORRECTIONS,
    SCALE_MODES,
)


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text and validation metadata."""
    meta["help"] = help
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    path: str = opt(
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Model to train: a hub id, a local MLX/HF directory, or builtin:NAME (offline tiny "
        "models).",
    )
    adapter_path: str | None = opt(None, "Existing LoRA adapters to start from (a directory).")
    dtype: str = opt(
        "auto",
        "Compute dtype; auto = bfloat16 on GPU, float32 on CPU.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = opt(False, "Allow tokenizers that ship custom code (hub models).")


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = opt("runs", "Directory that holds one sub-directory per run.")
    run_name: str = opt(
        "",
        "Run directory name; empty = a timestamp such as 20261121-084012.",
        path_component=True,
    )
    seed: int = opt(0, "Seed for data order, sampling and initialisation.", min=0)
    num_epochs: int = opt(1, "Passes over the training prompts.", min=1)
    max_steps: int = opt(0, "Stop after this many updates; 0 = as many as the epochs give.", min=0)
    max_train_samples: int = opt(0, "Use at most this many training prompts; 0 = all.", min=0)
    resume: str = opt(
        "auto",
        "auto = continue from the newest checkpoint in the run directory, never = start fresh, "
        "or a checkpoint directory.",
    )
    resume_despite_changes: bool = opt(
        False,
        "Resume from a checkpoint written with other model, finetune or data settings (it "
        "is refused otherwise, naming the changes); its weights must still fit the model.",
    )
    compile: bool = opt(
        True,
        "Accepted for configs of the original (use_compile) and ignored: every GRPO "
        "micro-batch has a new shape, so mx.compile would recompile the step at every call.",
    )


@dataclass(frozen=True)
class FinetuneConfig:
    type: str = opt("lora", "What to train.", choices=("lora", "dora", "full"))
    lora_rank: int = opt(8, "LoRA rank.", min=1)
    lora_scale: float = opt(20.0, "LoRA scale (alpha / rank, as mlx-lm counts it).", gt=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.", min=0, max=1)
    lora_layers: int = opt(
        -1,
        "Apply LoRA to the last N transformer blocks; -1 (default) = all of them, whatever the "
        "model's depth.",
        min=-1,
    )
    target_modules: list[str] = opt(
        [], "Module names to adapt (e.g. self_attn.q_proj); empty = mlx-lm's defaults."
    )
    grad_checkpoint: bool = opt(
        True,
        "Keep only each transformer block's input for the backward pass and recompute the "
        "rest there: a fraction of the memory for about one more forward pass.",
    )
    reuse_rollout_activations: bool = opt(
        True,
        "With grad_checkpoint: the rollout records each transformer block's output at the "
        "completion tokens and the training pass's first iteration uses them instead of "
        "running its forward pass over the completions (same gradient, about one forward pass "
        "less). Costs rows x new tokens x blocks x hidden floats of memory for the update; "
        "off, or skipped automatically, with dropout, tools or models without the "
        "shared-prompt layout.",
    )
    lm_head_chunk: int = opt(
        0,
        "Completion positions the LM head and log-probs process at once, one chunk in memory "
        "at a time (a frozen head walks the vocabulary in ~48 MB tiles and prepares each "
        "chunk's gradient in the forward pass; a trained one recomputes its chunks in the "
        "backward pass). 0 = automatic (512 positions for a frozen head, about 320 MB of "
        "logits for a trained one).",
        min=0,
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt(
        "gsm8k",
        "gsm8k, synthetic:NAME (offline), a local .jsonl/.json/.parquet/.csv file or directory, "
        "or a hub id.",
    )
    subset: str | None = opt(None, "Dataset configuration name (gsm8k uses 'main').")
    train_split: str = opt("train", "Split to train on.")
    eval_split: str = opt("test", "Split for evaluation.")
    prompt_field: str = opt("question", "Column holding the prompt text.")
    answer_field: str = opt("answer", "Column holding the reference answer.")
    system_prompt: str | None = opt(
        None, "System prompt; unset = the task's default (GSM8K asks for <reasoning>/<answer>)."
    )
    shuffle: bool = opt(True, "Shuffle training prompts with the run seed.")


@dataclass(frozen=True)
class RolloutConfig:
    num_generations: int = opt(8, "Completions sampled per prompt (the group size G).", min=2)
    max_new_tokens: int = opt(256, "Token budget per completion.", min=1)
    max_prompt_length: int = opt(512, "Prompts longer than this many tokens are cut.", min=1)
    max_rows: int = opt(
        0,
        "Most completions decoded at once; 0 = all of a batch's. Lower it to bound the "
        "rollout's KV cache (peak memory) at the cost of rollout speed; completions stay the "
        "ones a single batch samples.",
        min=0,
    )
    temperature: float = opt(0.7, "Sampling temperature for rollouts.", gt=0)
    top_p: float = opt(1.0, "Nucleus sampling threshold; 1 = off.", min=0, max=1)
    top_k: int = opt(0, "Sample from the k most likely tokens; 0 = off.", min=0)
    min_p: float = opt(0.0, "Drop tokens below min_p x the top probability; 0 = off.", min=0, max=1)
    repetition_penalty: float = opt(1.0, "Penalty on already generated tokens; 1 = off.", gt=0)
    stop: list[str] = opt([], "Extra stop strings (EOS always stops).")
    tools: list[str] = opt(
        [],
        "Tools completions may call while they generate: calculator, 'file.py:function' or "
        "'module:function' (text in, text out). The call format comes from the tokenizer "
        "(nanochat's python blocks, a chat template's <tool_call>); results are forced in and "
        "left out of the loss.",
    )
    max_tool_calls: int = opt(4, "Tool calls per completion; later calls get an error.", min=0)
    tool_timeout_s: float = opt(5.0, "Time limit of one tool call (seconds).", gt=0)
    quantize_bits: int = opt(
        0,
        "Accepted for configs of the original (quantize_for_rollouts); rollouts always use the "
        "training weights, so the importance ratio stays exact.",
        choices=(0, 2, 3, 4, 6, 8),
    )


@dataclass(frozen=True)
class AlgorithmConfig:
    type: str = opt(
        "grpo",
        "What the run trains: grpo = sample, score and reinforce (the keys below, [rollout] "
        "and [rewards]); sft = supervised fine-tuning on demonstrations ([sft]); mix = grpo "
        "plus mix.sft_weight x the SFT loss on a batch of demonstrations each update ([mix]).",
        choices=("grpo", "sft", "mix"),
    )
    loss_type: str = opt(
        "grpo",
        "Policy loss. Clipped ratio, normalised per sequence (grpo), per micro-batch's tokens "
        "(bnpo), by sequences x max_new_tokens (dr_grpo) or by the update's tokens (dapo); "
        "gspo = grpo with importance_sampling_level = sequence (GSPO); cispo = clipped "
        "stop-gradient ratio times log-prob, upper bound 1 + clip_eps_high only, token-"
        "normalised (MiniMax-M1); sapo = soft gate sigmoid(tau (r - 1)) 4 / tau instead of a "
        "clip, per sequence (SAPO, tau from sapo_tau_pos / sapo_tau_neg).",
        choices=LOSS_TYPES,
    )
    importance_sampling_level: str = opt(
        "token",
        "Importance ratio per token, or per sequence (exp of the mean token log-ratio, as in "
        "GSPO) for any loss type; gspo is always sequence.",
        choices=IMPORTANCE_LEVELS,
    )
    clip_eps: float = opt(0.2, "Lower clip range: ratios below 1 - clip_eps are clipped.", min=0)
    clip_eps_high: float | None = opt(
        None,
        "Upper clip range (1 + clip_eps_high); unset = clip_eps. DAPO uses 0.28; for cispo it "
        "is the weight's only bound.",
        min=0,
    )
    sapo_tau_pos: float = opt(
        1.0, "SAPO gate temperature for positive advantages (the paper's 1.0).", gt=0
    )
    sapo_tau_neg: float = opt(
        1.05,
        "SAPO gate temperature for negative advantages (the paper's 1.05; larger fades faster).",
        gt=0,
    )
    rollout_correction: str = opt(
        "none",
        "Correct for a sampler that differs from the trainer, with w = pi_old / pi_sampler from "
        "the rollout's recorded log-probs: tis (truncated IS) weights the policy term by w "
        "clamped to [min, cap]; mis (masked IS) by w where min <= w <= cap and 0 elsewhere; "
        "reject keeps the term unweighted where min <= w <= cap and drops it elsewhere.",
        choices=ROLLOUT_CORRECTIONS,
    )
    rollout_correction_cap: float = opt(2.0, "The upper bound on w for rollout_correction.", gt=0)
    rollout_correction_min: float = opt(
        0.0,
        "The lower bound on w for rollout_correction (TRL's clip_min); 0 = none.",
        min=0,
    )
    rollout_correction_level: str = opt(
        "token",
        "w per token, or per sequence (the product over the completion's tokens).",
        choices=IMPORTANCE_LEVELS,
    )
    top_entropy_quantile: float = opt(
        1.0,
        "Share of completion tokens, highest entropy first, that drive the policy gradient "
        "(Wang et al. 2025 use 0.2). The threshold is the quantile over all trained completion "
        "tokens of the update, from the entropies the rollout recorded; KL and entropy terms "
        "still cover every token. 1.0 = off.",
        gt=0,
        max=1,
    )
    kl_coeff: float = opt(
        0.0, "Weight of the KL penalty to the reference model; 0 = no reference.", min=0
    )
    kl_estimator: str = opt(
        "k3",
        "KL estimator per token: k1, k2, k3, or k3_is (k3 times the importance ratio: TRL's "
        "bias-corrected KL, use_bias_correction_kl).",
        choices=KL_ESTIMATORS,
    )
    delta: float | None = opt(
        None,
        "Cap on the unclipped ratio of the clipped losses (INTELLECT-2's two-sided clip, TRL's "
        "delta); must exceed 1 + clip_eps_high. None = no cap.",
        gt=1,
    )
    off_policy_mask_threshold: float | None = opt(
        None,
        "Drop the policy term of completions with a negative advantage whose mean per-token "
        "log pi_sampler - log pi exceeds this (DeepSeek-V3.2's off-policy sequence masking, TRL's "
        "off_policy_mask_threshold). None = off.",
        min=0,
    )
    entropy_coeff: float = opt(
        0.0, "Entropy bonus weight (the starting weight when entropy_target is set).", min=0
    )
    entropy_target: float | None = opt(
        None,
        "Steer the entropy bonus's weight toward this mean token entropy (nats): after each "
        "update it moves by entropy_coeff_step, up below the target, down above it, within "
        "[entropy_coeff_min, entropy_coeff_max]. None = a fixed entropy_coeff.",
        min=0,
    )
    entropy_coeff_step: float = opt(
        0.005, "How far entropy_target moves the weight per update.", gt=0
    )
    entropy_coeff_min: float = opt(0.0, "Lowest weight entropy_target may set.", min=0)
    entropy_coeff_max: float = opt(0.1, "Highest weight entropy_target may set.", min=0)
    scale_rewards: str = opt(
        "group",
        "Advantage scaling: group = divide by the group's std, batch = the batch's std, none. "
        "Population std (divides by G): TRL uses the sample std (G - 1), so its advantages are "
        "sqrt(G / (G - 1)) times smaller.",
        choices=SCALE_MODES,
    )
    advantage_estimator: str = opt(
        "grpo",
        "How rewards become advantages, as verl defines each: grpo (group mean and std, "
        "scale_rewards), rloo (leave-one-out mean), reinforce_pp (REINFORCE++: rewards "
        "whitened over the update's tokens), reinforce_pp_baseline (group mean subtracted, "
        "then whitened), opo (group mean weighted by completion length).",
        choices=ADVANTAGE_ESTIMATORS,
    )
    reward_aggregation: str = opt(
        "sum_then_normalize",
        "Several reward functions: sum their weighted values, then compute advantages "
        "(sum_then_normalize), or normalise each within its group, sum, and normalise the sum "
        "over the update (normalize_then_sum, GDPO; with advantage_estimator = grpo).",
        choices=REWARD_AGGREGATIONS,
    )
    num_iterations: int = opt(1, "Optimisation passes over each rollout batch.", min=1)
    mask_truncated_completions: bool = opt(
        False, "Leave completions that hit max_new_tokens out of the loss (DAPO)."
    )
    filter_zero_std_groups: bool = opt(
        False, "Drop groups whose rewards are all equal (they carry no signal)."
    )
    dynamic_sampling: bool = opt(
        False,
        "DAPO's dynamic sampling: keep drawing prompts until the update holds batch_size "
        "groups whose rewards differ (extra prompts come from the data stream).",
    )
    max_resample_batches: int = opt(
        4,
        "Most extra rollouts of batch_size prompts one update may draw with dynamic_sampling; "
        "then it trains on the informative groups it has.",
        min=0,
    )
    overlong_penalty: float = opt(
        0.0, "Largest reward penalty for completions running into the token budget; 0 = off.", min=0
    )
    overlong_buffer: int = opt(
        0,
        "Tokens before the budget where the overlong penalty ramps up; 0 = a quarter of it.",
        min=0,
    )


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = opt("adamw", "Optimizer.", choices=("adam", "adamw"))
    learning_rate: float = opt(1e-6, "Peak learning rate.", gt=0)
    lr_scheduler_type: str = opt(
        "cosine", "Decay after warm-up.", choices=("constant", "linear", "cosine")
    )
    warmup_ratio: float = opt(0.1, "Share of the run's updates spent warming up.", min=0, max=1)
    max_grad_norm: float = opt(0.1, "Clip gradients to this global norm; 0 = off.", min=0)
    adam_beta1: float = opt(0.9, "Adam beta1.", min=0, max=1)
    adam_beta2: float = opt(0.999, "Adam beta2.", min=0, max=1)
    weight_decay: float = opt(0.0, "Decoupled weight decay (adamw).", min=0)
    batch_size: int = opt(4, "Prompts per optimizer update (each sampled G times).", min=1)
    gradient_accumulation_steps: int = opt(
        4, "Micro-batches an update's completions are split into (bounds memory).", min=1
    )
    max_tokens_per_microbatch: int = opt(
        0,
        "Pack micro-batches by token count instead: completions sorted by length, each "
        "micro-batch at most this many tokens (rows x longest sequence, padding included; a "
        "longer sequence gets a micro-batch of its own); gradient_accumulation_steps is then "
        "not used. 0 = off.",
        min=0,
    )
    steps_per_generation: int = opt(
        1,
        "Optimizer steps per rollout: one rollout of this many batches of batch_size prompts "
        "feeds this many updates, each on its own share of the groups, with the rollout's "
        "policy as the old policy of every share. Advantages are taken over the whole rollout. "
        "Checkpoints fall between rollouts, so checkpoint.save_steps and run.max_steps must be "
        "multiples of it.",
        min=1,
    )
    max_nonfinite_updates: int = opt(
        3,
        "Stop the run after this many consecutive updates skipped for a NaN/inf loss or "
        "gradient norm (a skipped update leaves the weights unchanged).",
        min=1,
    )


@dataclass(frozen=True)
class SftConfig:
    train_on_prompt: bool = opt(
        False,
        "Train on every token of a conversation, not only its assistant turns (a plain text "
        "always trains whole). The [sft] keys serve algorithm.type = sft and mix.",
    )
    max_length: int = opt(
        2048,
        "Longest demonstration in tokens; a longer one is cut at the end (the update's "
        "truncated_examples counts them).",
        min=2,
    )
    packing: bool = opt(
        False,
        "Pack short demonstrations into rows of up to max_length tokens, none attending to "
        "another (less padding). A model where that is not exact (absolute position "
        "embeddings, recurrent layers) trains unpacked, and the run says why.",
    )
    completion_field: str = opt(
        "completion",
        "Column with a demonstration's completion, beside data.prompt_field. A 'messages' "
        "column (chat turns) or a 'text' column (trained whole) is used instead when present.",
    )


@dataclass(frozen=True)
class MixConfig:
    sft_weight: float = opt(
        0.1,
        "Weight of the SFT loss added to each update's GRPO loss (algorithm.type = mix).",
        min=0,
    )
    dataset: str = opt(
        "",
        "Where the demonstrations come from, as data.dataset names data; empty = data.dataset "
        "itself (a synthetic task's own demonstrations, or the file's demonstration columns).",
    )
    batch_size: int = opt(0, "Demonstrations per update; 0 = optim.batch_size.", min=0)


@dataclass(frozen=True)
class RewardsConfig:
    functions: list[str] = opt(
        [],
        "Reward functions: built-in names, module:function or path/file.py:function; "
        "empty = the dataset's defaults.",
    )
    weights: list[float] = opt([], "One weight per function; empty = all 1.")
    timeout_s: float = opt(
        60.0,
        "Longest one reward call may take, in seconds; a slower call counts as a failure for "
        "that batch (its thread is abandoned, not killed). 0 = no limit.",
        min=0,
    )
    max_consecutive_failures: int = opt(
        3,
        "Stop the run when a reward function fails (raises, returns the wrong number or "
        "non-numbers, or times out) on every call for this many consecutive updates.",
        min=1,
    )


@dataclass(frozen=True)
class EvalConfig:
    every_updates: int = opt(0, "Evaluate every N updates; 0 = off.", min=0)
    samples: int = opt(200, "Held-out prompts per evaluation.", min=1)
    max_new_tokens: int = opt(128, "Token budget per evaluation completion.", min=1)
    temperature: float = opt(0.7, "Sampling temperature for pass@k; pass@1 is greedy.", min=0)
    pass_k: int = opt(1, "k for pass@k (1 = greedy accuracy only).", min=1)
    before_training: bool = opt(False, "Also evaluate before the first update.")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings for `mlxgrpo infer` and `mlxgrpo chat` (training samples with [rollout])."""

    max_tokens: int = opt(512, "Token budget per answer.", min=1)
    temperature: float = opt(0.7, "Sampling temperature; 0 = greedy.", min=0)
    top_p: float = opt(1.0, "Nucleus sampling threshold; 1 = off.", min=0, max=1)
    top_k: int = opt(0, "Sample from the k most likely tokens; 0 = off.", min=0)
    min_p: float = opt(0.0, "Drop tokens below min_p x the top probability; 0 = off.", min=0, max=1)
    repetition_penalty: float = opt(1.0, "Penalty on already generated tokens; 1 = off.", gt=0)
    system_prompt: str | None = opt(None, "System message for every prompt; unset = none.")
    chat_template: bool = opt(True, "Wrap prompts in the model's chat template.")
    stop: list[str] = opt([], "Extra stop strings (EOS always stops).")
    seed: int = opt(0, "Sampling seed.", min=0)


@dataclass(frozen=True)
class LoggingConfig:
    logging_steps: int = opt(1, "Show a reward table every N updates.", min=1)
    jsonl: bool = opt(True, "Write metrics.jsonl in the run directory.")
    log_completions: bool = opt(False, "Write completions.jsonl (prompt, completion, rewards).")
    tensorboard: bool = opt(False, "Write TensorBoard event files to <run>/tensorboard/.")
    wandb_project: str | None = opt(
        None,
        "Log to this Weights & Biases project (needs mlxgrpo[wandb]; WANDB_MODE=offline works); "
        "unset = off.",
    )
    log_completions_steps: int = opt(
        10, "Send a table of sample completions to W&B every N updates; 0 = never.", min=0
    )


@dataclass(frozen=True)
class CheckpointConfig:
    save_steps: int = opt(100, "Save a checkpoint every N updates; 0 = only the final one.", min=0)
    keep_last: int = opt(3, "Keep this many recent checkpoints; 0 = keep all.", min=0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def get(self, key: str) -> Any:
        section, name = key.split(".", 1)
        return getattr(getattr(self, section), name)

    def to_dict(self, drop_none: bool = False) -> dict[str, dict[str, Any]]:
        result = dataclasses.asdict(self)
        if drop_none:
            result = {s: {k: v for k, v in d.items() if v is not None} for s, d in result.items()}
        return result


@dataclass(frozen=True)
class FieldSpec:
    """Everything the resolver needs to know about one dotted key."""

    key: str
    section: str
    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None
    path_component: bool = False  # a single file or directory name, never a path


def _section_classes() -> dict[str, type]:
    hints = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    return hints  # section name -> dataclass type


def field_specs() -> dict[str, FieldSpec]:
    """All dotted keys of the schema, in declaration order."""
    import typing

    specs: dict[str, FieldSpec] = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meta = f.metadata
            key = f"{section}.{f.name}"
            specs[key] = FieldSpec(
                key=key,
                section=section,
                name=f.name,
                type=hints[f.name],
                default=default,
                help=meta.get("help", ""),
                choices=meta.get("choices"),
                min=meta.get("min"),
                max=meta.get("max"),
                gt=meta.get("gt"),
                path_component=meta.get("path_component", False),
            )
    return specs


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def build_config(values: dict[str, Any]) -> Config:
    """Build a Config from a complete mapping of dotted keys to already-typed values."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    classes = _section_classes()
    return Config(**{s: classes[s](**sections[s]) for s in SECTIONS})
