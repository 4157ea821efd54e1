"""Synthetic temporal video-QA data in MVBench format."""
from stllm_engine.datasets.synthetic import SyntheticConfig, build_dataset
from stllm_engine.datasets.tasks import TASKS, TASKS_BY_NAME

__all__ = ["SyntheticConfig", "build_dataset", "TASKS", "TASKS_BY_NAME"]
