"""Evaluation: per-expression statistics and referring-segmentation metrics."""
from rsam.evaluation.metrics import (
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
    "OFFICIAL",
    "STANDARD",
    "MetricAccumulator",
    "MetricConvention",
    "compute_metrics",
    "expression_stats",
    "format_metrics",
    "gather_stats",
    "per_expression_iou",
]
