"""MVBench-format evaluation (real MVBench data or the synthetic set)."""
from stllm_engine.evaluation.answerers import MVBenchAnswerer, load_answerer
from stllm_engine.evaluation.mvbench import EvalResult, TaskScore, evaluate
from stllm_engine.evaluation.mvbench_data import (MVBENCH_TASKS, MVBenchDataError, MVBenchItem,
                                                  check_answer, format_question, load_items,
                                                  load_task_table)

__all__ = ["MVBenchAnswerer", "load_answerer", "EvalResult", "TaskScore", "evaluate",
           "MVBENCH_TASKS", "MVBenchDataError", "MVBenchItem", "check_answer", "format_question",
           "load_items", "load_task_table"]
