"""SPRInG's parametric half: drift-selective per-user LoRA updates with a residual replay buffer."""

from .adapter_pool import AdapterPool
from .continual import ContinualPersonalizer, ForgetReport
from .data import EncodedSample, SpringDataCollator, SpringDataset, SpringFormatter
from .drift import (
    BaseLogProbCache,
    DriftScores,
    LogProb,
    compute_logprobs,
    drift_score,
    drift_scores,
    num_selected,
    response_nll,
    select_top,
)
from .lora import adapter_name_for, build_lora_config, find_lora_target_modules
from .sharding import UserShard, claim_user_shard, shard_of
from .spring_config import TRAINING_PRESETS, SpringTrainingArguments, default_learning_rate
from .spring_trainer import SpringPeriodOutput, SpringTrainer
from .train_job import run_train_job
from .train_job_config import TrainJobArguments
from .tuning import PersonalizationTuner, TuningResult, run_tune_job
from .tuning_config import TuningArguments

__all__ = [
    "AdapterPool",
    "BaseLogProbCache",
    "ContinualPersonalizer",
    "DriftScores",
    "EncodedSample",
    "ForgetReport",
    "LogProb",
    "PersonalizationTuner",
    "SpringDataCollator",
    "SpringDataset",
    "SpringFormatter",
    "SpringPeriodOutput",
    "SpringTrainer",
    "SpringTrainingArguments",
    "TRAINING_PRESETS",
    "TrainJobArguments",
    "TuningArguments",
    "TuningResult",
    "UserShard",
    "adapter_name_for",
    "build_lora_config",
    "claim_user_shard",
    "compute_logprobs",
    "default_learning_rate",
    "drift_score",
    "drift_scores",
    "find_lora_target_modules",
    "num_selected",
    "response_nll",
    "run_train_job",
    "run_tune_job",
    "select_top",
    "shard_of",
]
