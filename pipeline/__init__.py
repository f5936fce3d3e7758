"""Personalization pipeline: one module per stage, no Airflow imports."""

__version__ = "0.1.0"
