"""Reports of runs, pretraining and fine-tuning alike (``python -m common.reports --baseline RUN --runs RUN ...``)."""
