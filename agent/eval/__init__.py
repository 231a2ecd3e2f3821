"""Evaluation: the metrics of ../shared/spec/metrics.md."""
