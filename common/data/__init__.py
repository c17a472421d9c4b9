"""Data: corpora on disk to Lhotse manifests (``corpora``), manifests to batches of clips (``loader``), and what
guards them (bad audio and integrity checks, fingerprints, the decoded-clip cache, checks before a run).

The modules, by what they do (one concept each):

- reading audio: one training clip decoded safely (``decode``), a user's file read a window at a time and cut
  into windows for prediction and embedding (``audio_file``), is a file whole (``integrity``), Lhotse without its
  shell (``lhotse_safety``), bad audio counted and judged (``bad_audio``);
- the loader: the loader that ties the rest and resumes exactly (``loader``), batches of clips (``clips``), its
  worker processes (``workers``) and the shared memory they hand batches through (``shared_memory``), background
  prefetch (``prefetch``), equal shards per rank (``shards``), AST's balanced sampling (``balanced``), Shar
  folders read in one part per rank (``shar_stream``), the on-disk index of a whole-set shuffle
  (``manifest_index``), the decoded-clip cache (``cache``);
- manifests and checks: a recipe's data section (``config``), manifests opened and mixed (``manifests``), their lines
  read and counted (``manifest_lines``), which manifests a run trained on (``fingerprint``), the pre-flight check
  of a recipe's files (``preflight``);
- ``corpora/``: one module per corpus, each preparing its manifests (``c2f-corpora``).
"""
