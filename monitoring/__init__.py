"""Prometheus exporter, Grafana dashboards and alert rules (coming with the monitoring issue)."""
