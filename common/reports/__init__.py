"""Reports of runs, pretraining and fine-tuning alike (python -m common.reports RUN ...)."""
