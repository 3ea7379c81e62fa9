"""Prometheus exporter of training metrics, Prometheus scrape config and alert rules, Grafana dashboard.

Imports neither launch/ nor pipelines/: the training loop creates a `TrainingMetrics` and feeds it.
"""

from monitoring.exporter import PortInUseError, TrainingMetrics

__all__ = ["PortInUseError", "TrainingMetrics"]
