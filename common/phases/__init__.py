"""The coarse-to-fine schedule: phase configs, planned cost, stop criteria, baselines, transitions between phases."""
