"""Training settings (:class:`TrainConfig`, one per stage) and the named presets.

A preset gives each stage (``pretrain``, ``sft``, ``rl``) its settings; flags override them. Model and
task defaults are those of :class:`~tsds_interp.model.ModelConfig` and
:class:`~tsds_interp.task.TaskConfig`. ``tiny`` is for tests (seconds), ``small`` and ``steps_small``
for the shipped checkpoints (CPU, well under an hour per stage), ``paper`` and ``steps_paper`` for a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsds_interp import checks
from tsds_interp.model import ModelConfig
from tsds_interp.objectives import WEIGHTINGS
from tsds_interp.task import TaskConfig

_MODEL = ModelConfig()

STAGES = ("pretrain", "sft", "rl")


@dataclass(frozen=True)
class TrainConfig:
    """One stage's settings. Fields a stage does not use are ignored by it."""

    stage: str = "pretrain"
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    eval_questions: int = 512
    eval_temperature: float = 1.0
    ckpt_every: int = 250
    # model (pretrain only)
    n_layers: int = _MODEL.n_layers
    d_model: int = _MODEL.d_model
    n_heads: int = _MODEL.n_heads
    d_mlp: int = _MODEL.d_mlp
    width: int = _MODEL.task.width
    budget: int = _MODEL.task.budget
    train_cells: str = TaskConfig.format_cells(_MODEL.task.train_cells)
    ood_cells: str = TaskConfig.format_cells(_MODEL.task.ood_cells)
    task_format: str = _MODEL.task.task_format  # "steps": reflective calls over reduced states
    # reflective SFT
    sft_questions: int = 8192
    first_right_fraction: float = 0.5
    sft_mix: str = "fixed"  # "natural": keep the model's own first-attempt accuracy per cell
    sft_temperature: float = 1.0  # temperature of the model's own candidates in the SFT data
    rejected_samples: str = "train"  # "skip": train the REJECT after a wrong candidate, not the candidate
    verify_questions: int = 0  # questions that add paired verification rows (right + own wrong)
    add_layers: int = 0  # sft: grow the --init model by this many function-preserving blocks on top
    weighting: str = "token_mean"
    decision_share: float = 0.5
    # RL
    questions_per_step: int = 32
    group: int = 8
    ppo_epochs: int = 1
    clip_eps: float = 0.1
    beta: float = 0.1
    kl_estimator: str = "k3"
    advantage: str = "grpo"
    discount: float = 1.0
    temperature: float = 1.0
    rl_rejected_samples: str = "train"  # "mask": no policy gradient on rejected steps' tokens (steps)
    device: str = "cpu"
    autocast: str = "none"  # "bf16": bfloat16 autocast for forward passes (training and rollouts)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name, (lo, hi) in INT_RANGES.items():
            lo = 2 if name == "group" and self.advantage == "grpo" and self.stage == "rl" else lo
            checks.number(_setting(name), getattr(self, name), lo=lo, hi=hi, integer=True)
        for name, (lo, hi, lo_open) in REAL_RANGES.items():
            checks.number(_setting(name), getattr(self, name), lo=lo, hi=hi, lo_open=lo_open)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_setting(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        checks.device(self.device, _setting("device"))
        self.model_config()  # validates the model sizes and the task settings

    def task(self) -> TaskConfig:
        cells = {k: TaskConfig.parse_cells(str(getattr(self, k)), _setting(k)) for k in ("train_cells", "ood_cells")}
        try:
            return TaskConfig(width=self.width, budget=self.budget, task_format=self.task_format, **cells)
        except (ValueError, TypeError) as e:
            raise ValueError(f"bad task settings: {e}") from None

    def model_config(self) -> ModelConfig:
        task = self.task()
        try:
            return ModelConfig(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                               d_mlp=self.d_mlp, seed=self.seed, task=task)
        except ValueError as e:
            raise ValueError(f"bad model settings: {e}") from None


def _setting(name: str) -> str:
    """How the CLI spells a setting, with its library name: ``grad_clip (--grad-clip)``."""
    return f"{name} (--{name.replace('_', '-')})"


# Accepted values of every setting (the model sizes and task are checked by ModelConfig/TaskConfig).
INT_RANGES = {"steps": (1, 10**8), "batch_size": (1, 2**20), "warmup": (0, 10**8), "seed": (0, checks.MAX_SEED),
              "log_every": (1, 10**8), "eval_every": (1, 10**8), "ckpt_every": (1, 10**8),
              "eval_questions": (1, 10**6), "sft_questions": (1, 10**8), "verify_questions": (0, 10**8),
              "add_layers": (0, 256), "questions_per_step": (1, 2**20), "group": (1, 2**12),
              "ppo_epochs": (1, 100)}
REAL_RANGES = {"lr": (0, 10, True), "weight_decay": (0, 10, False), "grad_clip": (0, 1e6, True),
               "eval_temperature": (0, 100, False), "first_right_fraction": (0, 1, False),
               "sft_temperature": (0, 100, True), "decision_share": (0, 1, False), "clip_eps": (0, 10, True),
               "beta": (0, 1e3, False), "discount": (0, 1, True), "temperature": (0, 100, True)}
CHOICES = {"weighting": WEIGHTINGS, "kl_estimator": ("k1", "k3"), "autocast": ("none", "bf16"),
           "sft_mix": ("fixed", "natural"), "rejected_samples": ("train", "skip"),
           "advantage": ("grpo", "reinforce"), "task_format": ("oneshot", "steps"),
           "rl_rejected_samples": ("train", "mask")}


def _square_cells(n: int) -> str:
    """Every cell up to n x n digits, as a ``--train-cells`` value."""
    return TaskConfig.format_cells((i, j) for i in range(1, n + 1) for j in range(1, n + 1))


_TINY_MODEL = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128, width=2, budget=2,
                   train_cells="1x1,1x2,2x1", ood_cells="2x2", eval_questions=256, log_every=10,
                   eval_every=50, ckpt_every=50)
_PAPER_MODEL = dict(n_layers=5, d_model=256, n_heads=8, d_mlp=1024, width=6, budget=3, eval_questions=2048,
                    train_cells=_square_cells(5), ood_cells="6x6")
PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {
        "pretrain": dict(_TINY_MODEL, steps=300, batch_size=64, lr=3e-3, warmup=20),
        "sft": dict(_TINY_MODEL, steps=100, batch_size=64, lr=1e-3, warmup=10, sft_questions=1024),
        "rl": dict(_TINY_MODEL, steps=30, lr=5e-4, warmup=3, questions_per_step=16, group=4,
                   eval_every=15, ckpt_every=15, log_every=5),
    },
    # For one GPU: a 5-layer, d_model 256 model (about 4M parameters) on up to 5x5-digit products.
    "paper": {
        "pretrain": dict(_PAPER_MODEL, steps=20000, batch_size=512, lr=1e-3, warmup=500, eval_every=2000,
                         ckpt_every=1000, log_every=100),
        "sft": dict(_PAPER_MODEL, steps=3000, batch_size=512, lr=3e-4, warmup=100, sft_questions=65536,
                    eval_every=500, ckpt_every=500, log_every=50),
        "rl": dict(_PAPER_MODEL, steps=1000, lr=1e-4, warmup=20, questions_per_step=128, group=8,
                   eval_every=100, ckpt_every=50, log_every=10),
    },
    "small": {
        "pretrain": dict(steps=3000, batch_size=256, lr=2e-3, warmup=100, eval_every=500,
                         ckpt_every=250, log_every=50),
        "sft": dict(steps=600, batch_size=256, lr=5e-4, warmup=30, sft_questions=16384,
                    eval_every=200, ckpt_every=200, log_every=20),
        "rl": dict(steps=200, lr=2e-4, warmup=10, questions_per_step=32, group=8, eval_every=50,
                   ckpt_every=25, log_every=5),
    },
}
# The step format (reduced states, one call per digit of y). steps_small: in-distribution up to 4x4 digits,
# 5x5 out of distribution, the 4-layer d_model 128 model of "small"; SFT on the model's own steps
# labelled by the checker with paired verification rows (same state, right and wrong step), rejected
# steps not imitated, decision and sample tokens half of the loss each; RL with one outcome reward per
# episode. (Decision share 0.8 at lr 1e-3 cost the sampler a quarter of its step accuracy: see README.)
_STEPS_TINY = dict(_TINY_MODEL, task_format="steps", eval_questions=128, eval_every=1000, ckpt_every=1000)
_STEPS_SMALL = dict(task_format="steps", width=5, budget=3, ood_cells="5x5",
                    train_cells=_square_cells(4))
_STEPS_SFT = dict(sft_mix="natural", rejected_samples="skip", weighting="role_balanced", decision_share=0.5,
                  sft_temperature=1.0)
PRESETS["steps_tiny"] = {
    "pretrain": dict(PRESETS["tiny"]["pretrain"], **_STEPS_TINY),
    "sft": dict(PRESETS["tiny"]["sft"], **{**_STEPS_TINY, **_STEPS_SFT, "sft_questions": 512, "verify_questions": 256}),
    "rl": dict(PRESETS["tiny"]["rl"], **{**_STEPS_TINY, "steps": 20}),
}
PRESETS["steps_small"] = {
    "pretrain": dict(_STEPS_SMALL, steps=600, batch_size=256, lr=2e-3, warmup=50, eval_every=200,
                     ckpt_every=250, log_every=50),
    "sft": dict(_STEPS_SMALL, **_STEPS_SFT, steps=1000, batch_size=256, lr=3e-4, warmup=30, sft_questions=16384,
                verify_questions=32768, eval_every=200, ckpt_every=200, log_every=20),
    "rl": dict(_STEPS_SMALL, steps=150, lr=2e-4, warmup=10, questions_per_step=32, group=8, eval_every=50,
               ckpt_every=25, log_every=5),
}
PRESETS["steps_paper"] = {stage: dict(cfg, task_format="steps", **(_STEPS_SFT if stage == "sft" else {}))
                          for stage, cfg in PRESETS["paper"].items()}
PRESETS["steps_paper"]["sft"]["verify_questions"] = 131072

# The small preset with the reflective-SFT recipe whose decision checks (some) candidates: the model's
# natural accuracy per cell, rejected candidates not imitated, paired verification rows, decision
# tokens given 0.8 of the loss at twice the learning rate. Pretraining and RL are those of "small".
PRESETS["small_verify"] = {**PRESETS["small"], "sft": dict(
    PRESETS["small"]["sft"], sft_mix="natural", rejected_samples="skip", verify_questions=16384,
    weighting="role_balanced", decision_share=0.8, lr=1e-3)}


def preset_config(preset: str, stage: str, **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(stage=stage, **{**PRESETS[preset][stage], **overrides})
