"""From a waveform to the model's input: Kaldi fbank, time compression, a phase's front end, augmentation."""
