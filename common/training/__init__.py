"""The loop both entry points share and the run's record: spec, objective, optimizer, checkpoints, ledger."""
