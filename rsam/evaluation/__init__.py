"""Evaluation: per-expression statistics and metrics (:mod:`.metrics`), the one evaluation loop (:mod:`.engine`),
what its loader carries (:mod:`.inputs`), callbacks that write results (:mod:`.writers`) and re-scoring of written
predictions (:mod:`.rescore`)."""
from rsam.evaluation.engine import RESOLUTIONS, EvalResult, Evaluator, ScoredExpression, eval_step, evaluate
from rsam.evaluation.metrics import (
    DEFAULT_CONVENTION,
    OFFICIAL,
    STANDARD,
    MetricAccumulator,
    MetricConvention,
    compute_metrics,
    expression_stats,
    format_metrics,
    gather_stats,
    per_expression_iou,
)

__all__ = [
    "DEFAULT_CONVENTION",
    "OFFICIAL",
    "RESOLUTIONS",
    "STANDARD",
    "EvalResult",
    "Evaluator",
    "MetricAccumulator",
    "MetricConvention",
    "ScoredExpression",
    "compute_metrics",
    "eval_step",
    "evaluate",
    "expression_stats",
    "format_metrics",
    "gather_stats",
    "per_expression_iou",
]
