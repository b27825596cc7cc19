"""Evaluation: objective metrics, classic-codec baselines, reports and plots."""
