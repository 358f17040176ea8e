"""tsds_interp: where the decision and sampling functions of reflective RL live in a transformer."""

from tsds_interp.metrics import ds_metrics, predicted_accuracy
from tsds_interp.model import ModelConfig, build_model, load, save
from tsds_interp.rollout import Rollouts, rollout
from tsds_interp.task import TaskConfig, sample_questions, token_roles

__all__ = ["ModelConfig", "Rollouts", "TaskConfig", "build_model", "ds_metrics", "load",
           "predicted_accuracy", "rollout", "sample_questions", "save", "token_roles"]
