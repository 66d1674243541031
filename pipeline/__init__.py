"""Orchestration of the ERNIE 4.5 pipeline: CLI, config, stage graph, cache, Ray, MLflow."""
