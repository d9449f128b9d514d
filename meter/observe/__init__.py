"""Observability adapters: Prometheus metrics, the HTTP server, the live usage view."""
