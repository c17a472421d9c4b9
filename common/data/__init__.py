"""Data: corpora on disk to Lhotse manifests (``corpora``), manifests to batches of clips (``loader``), and what
guards them (bad audio and integrity checks, fingerprints, the decoded-clip cache, checks before a run)."""
