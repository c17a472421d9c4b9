"""Helpers the test modules share: tiny recipes and runs, corpora, checkpoints in official layouts, signals."""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from finetune.classifier import Classifier, save_classifier
from pretrain.run import main

ROOT = Path(__file__).resolve().parents[1]


RECIPE = ROOT / "recipes" / "synth_pretrain.yaml"


def tiny(corpus: Path, *extra: str, steps=(3, 3)) -> list[str]:
    """Overrides that make recipes/synth_pretrain.yaml a seconds-long run on the test corpus."""
    sets = [
        f"data.train=[{{path: {corpus / 'synth_pool.jsonl.gz'}}}]",
        f"data.valid=[{corpus / 'synth_valid.jsonl.gz'}]",
        "data.batch_size=4", "data.num_workers=0",
        "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        f"phases.0.steps={steps[0]}", f"phases.1.steps={steps[1]}",
        "train.log_every=1", "train.eval_every=2", "train.save_every=2", "train.eval_batches=1",
        "train.deterministic=true", "optim.warmup_steps=2", "baseline=null", *extra,
    ]
    return [a for s in sets for a in ("--set", s)]


def run(run_dir: Path, corpus: Path, *extra: str, steps=(3, 3), stop=None) -> int:
    argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(corpus, *extra, steps=steps)]
    if stop is not None:
        argv += ["--stop-after-steps", str(stop)]
    return main(argv)


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model.safetensors"))


def poison_loss_at(monkeypatch, micro_batch: int) -> None:
    """Make the SSAST loss of the ``micro_batch``-th micro-batch (1-based) NaN."""
    from pretrain.ssast import SSASTObjective

    real = SSASTObjective.train_step
    calls = {"n": 0}

    def poisoned(self, model, batch, pipeline, generator):
        loss, logs = real(self, model, batch, pipeline, generator)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == micro_batch else loss), logs

    monkeypatch.setattr(SSASTObjective, "train_step", poisoned)


HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")
# SSAST's mask drawer works on the host's own tensors (CPU, a CPU generator: pretrain.masking): its reads of them
# (how many patches its clusters cover) wait for no device
MASK_DRAWER = str(ROOT / "pretrain" / "masking.py")


def package_reader(path: str) -> bool:
    """Whether a host read from the file ``path`` is this package's own reading of a value a device may hold (its
    code, less the mask drawer): a ``keep`` for :func:`host_reads`."""
    return path.startswith(str(ROOT)) and path != MASK_DRAWER


@contextlib.contextmanager
def blocking_copies(monkeypatch, within) -> Iterator[dict]:
    """Count, while the method ``within`` (e.g. ``Trainer._micro_step``) runs, this package's ``.to(device)`` calls
    without ``non_blocking=True``: on a GPU each such copy of host data waits for the device. Yields
    ``{"calls": n, "copies": ["file:line", ...]}``."""
    owner, name = within
    real_call, real_to = getattr(owner, name), torch.Tensor.to
    found: dict = {"calls": 0, "copies": []}
    inside = {"on": False}

    def call(self, *args, **kwargs):
        found["calls"] += 1
        inside["on"] = True
        try:
            return real_call(self, *args, **kwargs)
        finally:
            inside["on"] = False

    def to(self, *args, **kwargs):
        moves = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
        caller = sys._getframe(1)
        if moves and not kwargs.get("non_blocking", False) and inside["on"] and \
                caller.f_code.co_filename.startswith(str(ROOT)):
            found["copies"].append(f"{Path(caller.f_code.co_filename).relative_to(ROOT)}:{caller.f_lineno}")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, call)
    monkeypatch.setattr(torch.Tensor, "to", to)
    yield found


@contextlib.contextmanager
def host_reads(keep: Callable[[str], bool] = lambda path: True, names: tuple[str, ...] = HOST_READS):
    """Every read of a tensor's value by the host while the context holds (``item``, ``bool``, ``float``,
    ``tolist``, ``cpu``: on a GPU each waits for the device), as ``"name file:line"`` of the code that read
    (``site-packages/`` cut), in the list yielded; ``keep(file)`` chooses the readers to count (e.g. the
    package's own files, or only while a step runs)."""
    found: list[str] = []
    real = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def read(self, *args, **kwargs):
            code, line = sys._getframe(1).f_code, sys._getframe(1).f_lineno
            if keep(code.co_filename):
                found.append(f"{name} {code.co_filename.split('site-packages/')[-1]}:{line}")
            return real[name](self, *args, **kwargs)
        return read

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield found
    finally:
        for name in names:
            setattr(torch.Tensor, name, real[name])


_PORTS_TAKEN = itertools.count()
_PORTS_PER_WORKER = 2000


def _free_port() -> int:
    """A free port for a multi-rank test's rendezvous, below the range the kernel hands out for connections
    (``ip_local_port_range``) and in a share of it of this pytest-xdist worker's own: a port found free with
    ``bind(0)`` could become another test's connection before rank 0's store listened on it (EADDRINUSE)."""
    try:
        lowest = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lowest = 32768
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    base = 10000 + worker * _PORTS_PER_WORKER
    if base + _PORTS_PER_WORKER > lowest:
        base = max(1024, lowest - _PORTS_PER_WORKER * (worker + 1))
    for _ in range(_PORTS_PER_WORKER):
        port = base + (os.getpid() + next(_PORTS_TAKEN)) % _PORTS_PER_WORKER
        with socket.socket() as sock:  # no SO_REUSEADDR: a port still in TIME_WAIT is passed over
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {base}-{base + _PORTS_PER_WORKER - 1}")


TINY = ["model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=4",
        "data.num_workers=0", "train.log_every=1", "optim.warmup_steps=0"]


@functools.cache
def can_mount() -> bool:
    """Whether this process may mount file systems in a namespace of its own (``unshare -m``, as root): a real
    tiny tmpfs for a full disk or a small /dev/shm."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def one_error(err: str) -> str:
    """The single ``error:`` line of a failed command (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# a tiny HTS-AT for the 1.27 s, 16 kHz clips of the built-in corpus: 32 mel bins, a 64 x 64 image of 2 chunks
TINY_HTSAT = ("model.arch=htsat", "model.htsat={sample_rate: 16000, clip_samples: 20320, n_fft: 512, hop_length: 160, "
              "mel_bins: 32, fmax: 8000, spec_size: 64, embed_dim: 16, depths: [1, 1, 1, 1], "
              "num_heads: [1, 2, 4, 8], window_size: 4, drop_path_rate: 0.0}",
              "data.batch_size=4", "data.num_workers=0", "train.log_every=1", "train.weight_average_from=null",
              "train.weight_average_top=null")


def sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _synth_root(tmp_path: Path, corpus: Path) -> Path:
    """A data root holding the session's test-size synth corpus as data/synth/."""
    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    return data


def ssast_pretrained_state(dim=64, depth=2, fshape=16, tshape=16, fdim=128, tdim=256):
    """An SSAST pretraining checkpoint with the documented key names and shapes (DataParallel prefix)."""
    n = (fdim // fshape) * (tdim // tshape)
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        "module.p_input_fdim": torch.tensor(fdim), "module.p_input_tdim": torch.tensor(tdim),
        "module.mask_embed": r(1, 1, dim),
        "module.cpredlayer.0.weight": r(dim, dim), "module.cpredlayer.0.bias": r(dim),
        "module.cpredlayer.2.weight": r(256, dim), "module.cpredlayer.2.bias": r(256),
        "module.gpredlayer.0.weight": r(dim, dim), "module.gpredlayer.0.bias": r(dim),
        "module.gpredlayer.2.weight": r(256, dim), "module.gpredlayer.2.bias": r(256),
        "module.v.cls_token": r(1, 1, dim), "module.v.dist_token": r(1, 1, dim),
        "module.v.pos_embed": r(1, n + 2, dim),
        "module.v.patch_embed.proj.weight": r(dim, 1, fshape, tshape), "module.v.patch_embed.proj.bias": r(dim),
        "module.v.norm.weight": r(dim), "module.v.norm.bias": r(dim),
        "module.v.head.weight": r(1000, dim), "module.v.head.bias": r(1000),
        "module.v.head_dist.weight": r(1000, dim), "module.v.head_dist.bias": r(1000),
    }
    for i in range(depth):
        p = f"module.v.blocks.{i}."
        sd.update({
            p + "norm1.weight": r(dim), p + "norm1.bias": r(dim),
            p + "attn.qkv.weight": r(3 * dim, dim), p + "attn.qkv.bias": r(3 * dim),
            p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
            p + "norm2.weight": r(dim), p + "norm2.bias": r(dim),
            p + "mlp.fc1.weight": r(4 * dim, dim), p + "mlp.fc1.bias": r(4 * dim),
            p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim),
        })
    return sd


CLASSES = ["a", "b", "c", "d"]


AUDIO = {"sample_rate": 16000, "num_mel_bins": 64, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
         "target_frames": 100, "norm": "esc50"}


FULL = {"compression": "none", "factor": 1}


def tiny_cfg(**changes) -> EncoderConfig:
    # overlapping patches with different strides, as AST's 10x10: the grid mapping must hold for both axes
    base = dict(embed_dim=32, depth=2, num_heads=2, num_mel_bins=64, input_tdim=100, fshape=16, tshape=16,
                fstride=10, tstride=12)
    return EncoderConfig(**{**base, **changes})


def tiny_classifier(path: Path, loss: str = "ce", pool: str = "prefix", cfg: EncoderConfig | None = None,
                    phase: dict = FULL, **meta) -> Path:
    torch.manual_seed(1)
    model = Classifier(ASTEncoder(cfg or tiny_cfg()), len(CLASSES), pool)
    torch.nn.init.normal_(model.head[1].weight, std=1.0)  # spread the scores: a flat output would prove nothing
    return save_classifier(model, path, CLASSES, {"audio": AUDIO, "phase": phase, "loss": loss,
                                                  "class_names": {"a": "Alpha", "c": "Gamma"}, **meta})


def _write(path, seconds: float, rate: int = 16000, seed: int = 0):
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t) * (t > seconds / 2)
    sf.write(path, wave.astype(np.float32), rate)
    return path


def slaney_mel_numpy(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters ``[n_fft // 2 + 1, n_mels]`` (the librosa formula)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lower = (freqs[None, :] - hz[:-2, None]) / (hz[1:-1] - hz[:-2])[:, None]
    upper = (hz[2:, None] - freqs[None, :]) / (hz[2:] - hz[1:-1])[:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (hz[2:] - hz[:-2]))[:, None]
    return weights.T


HTSAT_DEPTHS, HTSAT_HEADS, HTSAT_DIM, HTSAT_CLASSES, HTSAT_WINDOW, HTSAT_PATCH = (2, 2, 2, 2), (1, 1, 2, 2), 8, 5, 8, 4


def relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def official_state(spec_size: int = 256, fmax: float = 14000.0, seed: int = 0,
                   classes: int = HTSAT_CLASSES, sample_rate: int = 32000) -> dict[str, torch.Tensor]:
    """The state dict the official HTSAT_Swin_Transformer writes (``model/htsat.py``), random values
    (``sample_rate`` 16000: the Speech Commands model's filterbank, fmax 14000 above its Nyquist frequency)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    n, k = torch.arange(1024, dtype=torch.float64), torch.arange(513, dtype=torch.float64)
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / 1024)
    phase = 2 * math.pi * k[:, None] * n[None, :] / 1024
    s = {  # torchlibrosa's frozen extractors: a DFT basis times a periodic Hann window, librosa's mel filters
        "spectrogram_extractor.stft.conv_real.weight": (torch.cos(phase) * window).float()[:, None],
        "spectrogram_extractor.stft.conv_imag.weight": (-torch.sin(phase) * window).float()[:, None],
        "logmel_extractor.melW": torch.from_numpy(slaney_mel_numpy(sample_rate, 1024, 64, 50.0, fmax)).float(),
        "bn0.weight": 1 + rnd(64), "bn0.bias": rnd(64), "bn0.running_mean": -40 + 10 * rnd(64),
        "bn0.running_var": 100 + 50 * rnd(64).abs(), "bn0.num_batches_tracked": torch.tensor(1234),
        "patch_embed.proj.weight": rnd(HTSAT_DIM, 1, HTSAT_PATCH, HTSAT_PATCH), "patch_embed.proj.bias": rnd(HTSAT_DIM),
        "patch_embed.norm.weight": 1 + rnd(HTSAT_DIM), "patch_embed.norm.bias": rnd(HTSAT_DIM),
    }
    grid = spec_size // HTSAT_PATCH
    for i, (depth, heads) in enumerate(zip(HTSAT_DEPTHS, HTSAT_HEADS)):
        dim, res = HTSAT_DIM * 2**i, grid // 2**i
        w = min(res, HTSAT_WINDOW)
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            if j % 2 and res > HTSAT_WINDOW:  # shifted blocks keep their window mask ([windows, w^2, w^2], -100 / 0)
                s[p + "attn_mask"] = torch.where(rnd((res // w) ** 2, w * w, w * w) > 0, 0.0, -100.0)
            s.update({p + "norm1.weight": 1 + rnd(dim), p + "norm1.bias": rnd(dim),
                      p + "attn.relative_position_bias_table": rnd((2 * w - 1) ** 2, heads),
                      p + "attn.relative_position_index": relative_position_index(w),
                      p + "attn.qkv.weight": rnd(3 * dim, dim), p + "attn.qkv.bias": rnd(3 * dim),
                      p + "attn.proj.weight": rnd(dim, dim), p + "attn.proj.bias": rnd(dim),
                      p + "norm2.weight": 1 + rnd(dim), p + "norm2.bias": rnd(dim),
                      p + "mlp.fc1.weight": rnd(4 * dim, dim), p + "mlp.fc1.bias": rnd(4 * dim),
                      p + "mlp.fc2.weight": rnd(dim, 4 * dim), p + "mlp.fc2.bias": rnd(dim)})
        if i < len(HTSAT_DEPTHS) - 1:  # the official model merges patches at the end of a stage
            s.update({f"layers.{i}.downsample.reduction.weight": rnd(2 * dim, 4 * dim),
                      f"layers.{i}.downsample.norm.weight": 1 + rnd(4 * dim),
                      f"layers.{i}.downsample.norm.bias": rnd(4 * dim)})
    last = HTSAT_DIM * 2 ** (len(HTSAT_DEPTHS) - 1)
    s.update({"norm.weight": 1 + rnd(last), "norm.bias": rnd(last),
              "tscam_conv.weight": rnd(classes, last, 2, 3), "tscam_conv.bias": rnd(classes),
              "head.weight": rnd(classes, classes), "head.bias": rnd(classes)})
    return s


def save_lightning(state: dict, path, **extra) -> None:
    torch.save({"epoch": 7, "global_step": 7000, "pytorch-lightning_version": "1.5.9",
                "state_dict": {f"sed_model.{k}": v for k, v in state.items()}, **extra}, path)


# from conftest.py
def real_looking_signals(batch: int = 3, seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> torch.Tensor:
    """Different signals per row: a harmonic tone with vibrato, noise bursts, a chirp, speech-like AM noise."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    out = []
    for i in range(batch):
        kind = i % 4
        if kind == 0:
            f0 = 220 + 30 * torch.sin(2 * math.pi * 5 * t)
            phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
            x = sum(0.3 / k * torch.sin(k * phase) for k in range(1, 6))
        elif kind == 1:
            env = (torch.sin(2 * math.pi * 3 * t) > 0.3).float()
            x = 0.2 * env * torch.randn(n, generator=g)
        elif kind == 2:
            x = 0.4 * torch.sin(2 * math.pi * (100 + 1500 * t / seconds) * t)
        else:
            x = 0.3 * torch.randn(n, generator=g) * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t))
        out.append(x + 0.01 * torch.randn(n, generator=g))
    return torch.stack(out).float()


PREDICT_AUDIO = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
                 "target_frames": 64, "norm": "audioset"}


def tiny_classifier_file(tmp_path: Path, loss: str) -> Path:
    """A tiny AST classifier export (3 classes) for prediction tests."""
    torch.manual_seed(0)
    model = Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)), 3)
    torch.nn.init.normal_(model.head[1].weight, std=1.0)
    return save_classifier(model, tmp_path / f"{loss}.safetensors", ["a", "b", "c"],
                           {"audio": PREDICT_AUDIO, "phase": {"compression": "none", "factor": 1}, "loss": loss,
                            "class_names": {"a": "Alpha"}})


def _micro_step_trainer(tmp_path, kind: str, accum: int):
    """A single-process trainer of a tiny model (``ast`` / ``htsat`` classifier or ``ssast``), its engine and
    the phase's training front end."""
    from common.audio.pipeline import AudioConfig
    from common.data.config import DataConfig
    from common.models.ast.encoder import EncoderConfig
    from common.models.htsat import HTSATConfig
    from common.phases.config import PhaseConfig, TransferConfig
    from common.system.distributed import init_distributed
    from common.training.loop import Trainer
    from common.training.optim import OptimConfig
    from common.training.spec import RunSpec, TrainConfig
    from finetune.classifier import AugmentConfig, ClassifierObjective
    from pretrain.ssast import SSASTConfig, SSASTObjective

    classes = ["a", "b", "c"]
    if kind == "htsat":
        base, audio = HTSATConfig(sample_rate=16000, clip_samples=16000, n_fft=512, hop_length=160, mel_bins=32,
                                  fmax=8000, spec_size=64, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                  window_size=4, drop_path_rate=0.0, num_classes=3), None
    else:
        base = EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                             fstride=8, tstride=8)
        audio = AudioConfig(num_mel_bins=32, target_frames=64)
    objective = SSASTObjective(SSASTConfig()) if kind == "ssast" else ClassifierObjective(
        classes, "acc", "ce", AugmentConfig(freqm=8, timem=8, mixup=0.5))  # mixup and SpecAugment on
    spec = RunSpec(run_dir=tmp_path, base=base, audio=audio, phases=[PhaseConfig(epochs=1)], transfer=TransferConfig(),
                   optim=OptimConfig(grad_accum=accum, warmup_steps=0), train=TrainConfig(), data=DataConfig())
    trainer = Trainer(spec, objective, init_distributed())
    engine = trainer._engine(objective.build_model(trainer.cfgs[0]), 0)
    return trainer, engine, trainer._frontend(0, objective.specaug)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def fake_terminal(monkeypatch) -> Terminal:
    """stderr is a terminal from here to the end of the test (set in the test itself: pytest's capture puts its
    own stderr back between a fixture's setup and the test)."""
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _segments(text: str) -> list[str]:
    """What a terminal shows on each line or redraw: the text between carriage returns and newlines."""
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def _bars(text: str, desc: str) -> list[str]:
    return [s for s in _segments(text) if s.startswith(desc)]


def rank_error(rank: int, line: str) -> str:
    """An ``error:`` line as rank ``rank`` of a job of several prints it: after ``error:``, its rank and host
    (``common.cli``), so that the interleaved lines of a job say where each comes from."""
    import socket

    return line.replace("error: ", f"error: rank {rank} (host {socket.gethostname()}): ", 1)


def unsearchable(monkeypatch, folder: Path) -> None:
    """Paths under ``folder`` as another user's 0700 home shows them to this one (the suite runs as root, whom
    permissions do not stop): making a folder there, or asking whether a path there exists, is EACCES."""
    import errno
    import pathlib

    def denied(path) -> bool:
        return str(path).startswith(str(folder))

    def refuse(name):
        real = getattr(pathlib.Path, name)

        def check(self, *args, **kwargs):
            if denied(self):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        return check

    for name in ("mkdir", "is_dir", "is_file", "exists", "stat"):
        monkeypatch.setattr(pathlib.Path, name, refuse(name))
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)
    monkeypatch.setattr(os, "stat", stat)
