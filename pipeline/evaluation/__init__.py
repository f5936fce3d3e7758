"""Layer 4, judging models: the time-based holdout, tuning by expanding-window CV, the
promotion gate and the run report. Imports only the layers below."""
