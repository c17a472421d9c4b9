"""The stable Python interface to the AST family's front end: ``Fbank(frame_shift_ms=10, num_mel_bins=128,
sample_rate=16000)``, an ``nn.Module`` mapping waveforms ``[B, S]`` to Kaldi log-mel features ``[B, T, F]`` on any
device, with what an encoder's input needs beside it: ``pad_or_crop`` to the encoder's frames and ``normalize``
with a corpus's statistics (``NORM_STATS`` by name, or your own: ``NormStats(mean, std)``, or
``resolve_norm_stats`` of a stats JSON file that ``python -m common.data.corpora stats`` writes or of an export's
``norm_stats``).

The implementation lives in ``common/audio/fbank.py``; this module is the import path that code outside the
package is promised and keeps working when the package's insides move.
"""

from common.audio.fbank import NORM_STATS, Fbank, NormStats, normalize, pad_or_crop, resolve_norm_stats

__all__ = ["NORM_STATS", "Fbank", "NormStats", "normalize", "pad_or_crop", "resolve_norm_stats"]
