"""Failures that name their cause: one ``error:`` line naming the file and why, a non-zero exit status, and
nothing lost (the inputs, the run directory and its last checkpoint as they were).

Cases: an unreadable ``.safetensors`` model (``--init`` / ``--ckpt``), a full disk (a checkpoint, an atomic
write; on a real tiny file system under the DeepSpeed launcher at 2 and 3 ranks), a read-only run
directory, ``--run-dir`` or ``hf export --out`` naming a file, an empty manifest for ``corpora stats`` and
the linear probe.
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from finetune.classifier import Classifier, save_classifier
from tests.helpers import RECIPE, ROOT, _free_port, can_mount, one_error, tiny, unsearchable
from tests.helpers import run as pretrain

AUDIO = {"sample_rate": 16000, "num_mel_bins": 128, "frame_shift_ms": 10.0, "frame_length_ms": 25.0,
         "target_frames": 64, "norm": "audioset"}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data_root(tmp_path, synth_corpus) -> Path:
    data = tmp_path / "data"
    (data / "synth").mkdir(parents=True)
    for f in synth_corpus.glob("synth_*.json*"):
        (data / "synth" / f.name).symlink_to(f)
    return data


# ------------------------------------------------------------------------------- unreadable model files
@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_an_unreadable_safetensors_model_is_named_by_every_entry_point(tmp_path, data_root, damage, capsys):
    from finetune.linear_probe import main as probe
    from finetune.predict import main as predict
    from finetune.run import main as finetune
    from tests.helpers import _write

    torch.manual_seed(0)
    good = save_classifier(Classifier(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=64)), 3),
                           tmp_path / "good.safetensors", ["a", "b", "c"],
                           {"audio": AUDIO, "phase": {"compression": "none", "factor": 1}, "loss": "ce"})
    bad = tmp_path / "model.safetensors"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    before = bad.read_bytes()
    clip = _write(tmp_path / "clip.wav", 1.0)
    commands = {
        "finetune": lambda: finetune(["--init", str(bad), "--task", "synth", "--data-root", str(data_root),
                                      "--run-dir", str(tmp_path / "run")]),
        "predict": lambda: predict(["--ckpt", str(bad), str(clip)]),
        "probe": lambda: probe(["--init", str(bad), "--task", "synth", "--data-root", str(data_root),
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "probe.json")]),
    }
    for name, command in commands.items():
        capsys.readouterr()
        assert command() == 2, name  # bad input: the file given is no model
        line = one_error(capsys.readouterr().err)
        assert f"{bad} is not a readable safetensors file ({len(before)} bytes; truncated, or not a safetensors" \
            in line, (name, line)
    assert bad.read_bytes() == before  # nothing lost, nothing started
    assert not (tmp_path / "run").exists() and not (tmp_path / "probe.json").exists()


# ------------------------------------------------------------------------------------------ a full disk
class FakeDisk:
    """``shutil.disk_usage`` of every file system as this disk's, and ``torch.save`` failing as torch's zip
    writer fails on a full disk (a partial file, then ``unexpected pos``, no errno)."""

    def __init__(self, monkeypatch) -> None:
        self.free = 1 << 40
        self.fill_at_next_save = False
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr("common.system.disk.shutil.disk_usage", lambda path: usage(1 << 41, 1 << 40, self.free))
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if not self.fill_at_next_save:
                return real(obj, f, *args, **kwargs)
            Path(f).write_bytes(b"PK" + b"\0" * 4094)
            self.free = 0
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3980")

        monkeypatch.setattr(torch, "save", save)


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_named_and_the_last_checkpoint_stays(tmp_path, synth_corpus, monkeypatch,
                                                                           capsys):
    from common.training.checkpoint_files import damage

    run_dir, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    disk = FakeDisk(monkeypatch)
    assert pretrain(run_dir, synth_corpus, stop=2) == 0
    kept = snapshot(ckdir / "phase01-step000000002")
    # the disk fills while DeepSpeed writes the next checkpoint
    disk.fill_at_next_save = True
    capsys.readouterr()
    assert pretrain(run_dir, synth_corpus) == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {ckdir / '.tmp-phase01-step000000003'}: no space left on device (more than ")
    assert "needed, " in line and " free)" in line and "the last checkpoint phase01-step000000002 is intact" in line
    assert "the partial checkpoint was removed" in line and not list(ckdir.glob(".tmp-*"))  # the disk not left full
    assert (ckdir / "LATEST").read_text() == "phase01-step000000002"
    assert snapshot(ckdir / "phase01-step000000002") == kept and damage(ckdir / "phase01-step000000002") is None
    # less free space than the last checkpoint takes: refused before anything of the next one is written
    disk.fill_at_next_save = False
    size = sum(p.stat().st_size for p in (ckdir / "phase01-step000000002").iterdir())
    disk.free = size - 1
    assert pretrain(run_dir, synth_corpus) == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {ckdir}: no space left on device (") and " needed, " in line
    assert "nothing of it was written and phase01-step000000002 is intact" in line
    assert not list(ckdir.glob(".tmp-*")) and (ckdir / "LATEST").read_text() == "phase01-step000000002"
    # space again: the same command resumes from the intact checkpoint and finishes the run
    disk.free = 1 << 40
    assert pretrain(run_dir, synth_corpus) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["total"]["steps"] == 6 and (run_dir / "model.safetensors").is_file()
    # a new run where its first checkpoint cannot fit: refused before a step is trained (which would be lost)
    disk.free = 1000
    other = tmp_path / "other"
    assert pretrain(other, synth_corpus) == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {other / 'checkpoints'}: no space left on device (") and "1000 bytes free" in line
    assert "the run's first checkpoint needs at least its weights and optimiser state" in line
    assert not (other / "ledger.json").exists() and not list(other.glob("checkpoints/*"))


@pytest.mark.slow
def test_a_full_disk_at_the_checkpoints_record_says_the_last_checkpoint_is_intact(tmp_path, synth_corpus,
                                                                                 monkeypatch, capsys):
    """The disk fills as rank 0 writes the checkpoint's trainer_state.json, the last file before it is published:
    the line says that the last checkpoint is intact and that the partial one was removed (every rank had written
    its share), as for a full disk in DeepSpeed's files (it said only "no space left on device")."""
    import common.training.checkpoints as checkpoints

    run_dir, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    assert pretrain(run_dir, synth_corpus, stop=2) == 0
    real = checkpoints.atomic_write_text

    def write(path, text, *args, **kwargs):
        if Path(path).name == "trainer_state.json" and Path(path).parent.name.startswith(".tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "atomic_write_text", write)
    capsys.readouterr()
    assert pretrain(run_dir, synth_corpus) == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {ckdir / '.tmp-phase01-step000000003' / 'trainer_state.json'}: no space left")
    assert "the last checkpoint phase01-step000000002 is intact; the partial checkpoint was removed" in line
    assert not list(ckdir.glob(".tmp-*")) and (ckdir / "LATEST").read_text() == "phase01-step000000002"


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from common.models.exports import save_weights
    from common.system.atomic import atomic_path, atomic_write_text
    from common.system.disk import NoSpace

    target = tmp_path / "ledger.json"
    atomic_write_text(target, "old")

    def fills(tmp):
        tmp.write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(NoSpace, match=rf"^{target}: no space left on device \(more than 100 bytes needed, "):
        with atomic_path(target) as tmp:
            fills(tmp)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
    # safetensors reports the errno inside its own message
    export = tmp_path / "model.safetensors"
    save_weights(export, {"w": torch.zeros(4)}, {})
    before = export.read_bytes()

    def serialising_fails(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    with monkeypatch.context() as patch:
        patch.setattr("safetensors.torch.save_file", serialising_fails)
        with pytest.raises(NoSpace, match=rf"^{export}: no space left on device \(4096 bytes needed"):
            save_weights(export, {"w": torch.zeros(1024)}, {})
    # known size, too little space: refused before writing
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr("common.system.disk.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(NoSpace, match=r"\(4096 bytes needed, 1000 bytes free\)"):
            save_weights(export, {"w": torch.zeros(1024)}, {})
    assert export.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json",
                                                                                             "model.safetensors"]


mounts = pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` and mount (root): a real tiny file system")


@pytest.mark.slow
@mounts
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_full_file_system_under_the_deepspeed_launcher(tmp_path, synth_corpus, ranks):
    """A real tmpfs, first of 300 KiB: less than the first checkpoint's weights and optimiser state, refused before
    a step is trained; then of 660 KiB: the first checkpoint fills it while DeepSpeed writes; then of 1000 KiB:
    the first checkpoint fits, the second is refused. Each time one line per rank at most and no traceback
    (the rank that hit the disk says it, the others that their peer stopped), no checkpoint is lost, and with
    space again the run resumes and finishes (at 2 ranks; the resume itself is not what differs at 3)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run_dir = mnt / "run"
    argv = ["timeout", "-k", "10", "300", str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(_free_port()), str(ROOT / "pretrain" / "run.py"), "--recipe", str(RECIPE),
            "--run-dir", str(run_dir), *tiny(synth_corpus, f"data.batch_size={4 * ranks}",  # 4 clips per rank
                                             "train.zero_stage=0")]  # the sizes above are stage-0 checkpoints
    command = " ".join(f"'{a}'" for a in argv)
    stages = [("300k", "start"), ("660k", "mid"), ("1000k", "full")] + ([("64m", "again")] if ranks == 2 else [])
    script = f"mount -t tmpfs -o size=300k tmpfs {mnt} || exit 99\n"
    for size, name in stages:
        script += (f"mount -o remount,size={size} {mnt}\n{command} > {tmp_path}/{name}.out 2>&1; "
                   f"echo $? > {tmp_path}/{name}.rc\ncp -r {run_dir}/checkpoints {tmp_path}/{name}_checkpoints\n")
    script += f"cp {run_dir}/ledger.json {tmp_path}/ledger.json\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=1000, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr

    def failed(name: str) -> list[str]:
        out = (tmp_path / f"{name}.out").read_text()
        assert (tmp_path / f"{name}.rc").read_text().strip() not in ("0", "124", "137"), out[-3000:]
        errors = [line for line in out.splitlines() if "error:" in line and "launch.py" not in line]
        assert 1 <= len(errors) <= ranks and "Traceback" not in out and "]:   File " not in out, out[-5000:]
        others = [line for line in errors if "no space left on device" not in line]
        assert all(" another rank of the job stopped " in line for line in others), errors
        return [line for line in errors if line not in others]

    # too small for any checkpoint (about 626 KiB of weights and Adam moments at least; 704 KiB written): refused
    # before training, nothing written
    lines = failed("start")
    assert len(lines) >= 1 and all(f"{run_dir}/checkpoints: no space left on device (" in line and
                                   "the run's first checkpoint needs at least its weights and optimiser state" in line
                                   for line in lines), lines
    start = tmp_path / "start_checkpoints"  # the copy of the run's checkpoints folder, if there was one
    assert not start.exists() or not [p for p in start.iterdir() if p.name.startswith(("phase", ".tmp", "LATEST"))]
    assert "step 1 (" not in (tmp_path / "start.out").read_text()
    # the first checkpoint does not fit after all: the rank writing when the disk filled says where and how much
    lines = failed("mid")
    assert len(lines) >= 1 and all(f"{run_dir}/checkpoints/.tmp-phase01-step000000002: no space left on device "
                                   f"(more than " in line and "no checkpoint was published yet" in line
                                   for line in lines), lines
    assert not (tmp_path / "mid_checkpoints" / "LATEST").exists()
    # larger: the partial checkpoint is gone, the first fits, the second is refused by every rank before writing
    # (each says so, unless the launcher killed it first: it stops every rank once one has exited)
    lines = failed("full")
    assert len(lines) >= 1 and all(f"{run_dir}/checkpoints: no space left on device (" in line
                                       and "phase01-step000000002 is intact" in line for line in lines), lines
    assert (tmp_path / "full_checkpoints" / "LATEST").read_text() == "phase01-step000000002"
    assert sorted(p.name for p in (tmp_path / "full_checkpoints").iterdir() if p.name.startswith(("phase", ".tmp"))) \
        == ["phase01-step000000002"]
    if ranks != 2:
        return
    again = (tmp_path / "again.out").read_text()
    assert (tmp_path / "again.rc").read_text().strip() == "0", again[-3000:]
    assert json.loads((tmp_path / "ledger.json").read_text())["total"]["steps"] == 6


@pytest.mark.slow
@mounts
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_that_stops_on_a_full_disk_does_not_hang_the_others_in_a_gradient_reduction(tmp_path, synth_corpus,
                                                                                         ranks):
    """ZeRO-1 on several ranks (the default there) and a small disk: a rank stops on the full disk (at a checkpoint
    or at rank 0's export of the best model) while the others may already be in the next step's gradient
    all-reduce. It leaves without the barrier they would never meet: they stop too, saying a peer stopped, and
    nothing hangs."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = ["timeout", "-k", "10", "300", str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
            "--master_port", str(_free_port()), str(ROOT / "pretrain" / "run.py"), "--recipe", str(RECIPE),
            "--run-dir", str(mnt / "run"), *tiny(synth_corpus, f"data.batch_size={4 * ranks}", "train.zero_stage=1")]
    script = (f"mount -t tmpfs -o size=1000k tmpfs {mnt} || exit 99\n" + " ".join(f"'{a}'" for a in argv)
              + f" > {tmp_path}/out 2>&1; echo $? > {tmp_path}/rc\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = (tmp_path / "out").read_text()
    assert (tmp_path / "rc").read_text().strip() not in ("0", "124", "137"), out[-3000:]  # stopped, not hung
    errors = [line for line in out.splitlines() if "error:" in line and "launch.py" not in line]
    assert any("no space left on device" in line for line in errors), out[-3000:]
    assert all("no space left on device" in line or " another rank of the job stopped " in line for line in errors)
    assert "Traceback" not in out


# ------------------------------------------------------------------------------ the run directory itself
def _read_only_run(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` (a Python entry point) with ``folder`` read-only: a read-only bind mount for root, whom
    permissions do not stop, or the permissions taken away for other users."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, *argv]
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")] if p.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    if not can_mount():
        pytest.skip("running as root without `unshare -m`: a read-only folder cannot be made")
    script = f"mount --bind -o ro '{folder}' '{folder}' && exec " + " ".join(f"'{a}'" for a in command)
    return subprocess.run(["unshare", "-m", "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_a_read_only_run_directory_is_refused_before_any_compute(tmp_path, synth_corpus):
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, stop=2) == 0
    before = snapshot(run_dir)
    args = ["pretrain/run.py", "--recipe", str(RECIPE), "--run-dir", str(run_dir), *tiny(synth_corpus)]
    proc = _read_only_run(run_dir, args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error(proc.stderr)
    assert line.startswith(f"error: run directory {run_dir} cannot be written: ")
    assert line.endswith(("read-only file system", "permission denied")), line
    assert snapshot(run_dir) == before
    # a new run directory inside a read-only folder
    new = tmp_path / "ro" / "run"
    new.parent.mkdir()
    args = ["pretrain/run.py", "--recipe", str(RECIPE), "--run-dir", str(new), *tiny(synth_corpus)]
    proc = _read_only_run(new.parent, args)
    assert proc.returncode == 2 and one_error(proc.stderr).startswith(f"error: run directory {new} cannot be "
                                                                      f"written: ")
    assert not new.exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path, synth_corpus, data_root, capsys):
    from finetune.run import main as finetune

    afile = tmp_path / "notes.txt"
    afile.write_text("my notes\n")
    assert pretrain(afile, synth_corpus) == 2
    assert one_error(capsys.readouterr().err) == (f"error: --run-dir {afile} is a file, not a directory; name a new "
                                                  f"folder or an existing run directory")
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(data_root), "--run-dir", str(afile)]) == 2
    assert f"--run-dir {afile} is a file, not a directory" in one_error(capsys.readouterr().err)
    assert pretrain(afile / "run", synth_corpus) == 2  # a file on the way
    assert one_error(capsys.readouterr().err) == (f"error: run directory {afile / 'run'} cannot be written: not a "
                                                  f"directory")
    assert afile.read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]


def test_hf_export_out_naming_a_file_is_refused(tmp_path, capsys):
    pytest.importorskip("transformers")
    from common.models.hf_export import main as hf
    from tests.helpers import tiny_classifier

    model = tiny_classifier(tmp_path / "model.safetensors")
    out = tmp_path / "esc50_hf"
    out.write_text("not a folder\n")
    assert hf(["export", str(model), "--out", str(out)]) == 2
    assert one_error(capsys.readouterr().err).startswith(f"error: --out {out} is a file, not a directory")
    assert out.read_text() == "not a folder\n"


def test_hf_export_onto_a_full_disk(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from safetensors import SafetensorError

    from common.models.hf_export import main as hf
    from tests.helpers import tiny_classifier

    model = tiny_classifier(tmp_path / "model.safetensors")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("mine\n")

    def disk_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    assert hf(["export", str(model), "--out", str(out)]) == 2
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"error: {out / 'model.safetensors'}: no space left on device (") and " needed, " in line
    assert [p.name for p in out.iterdir()] == ["README.md"]  # nothing half written, nothing of the user's lost


# ---------------------------------------------------------------------------------------- empty manifests
@pytest.mark.parametrize("content", [b"", "gzip"])
def test_corpora_stats_on_an_empty_manifest(tmp_path, content, capsys):
    import gzip

    from common.data.corpora.__main__ import main as corpora

    manifest = tmp_path / "empty_train.jsonl.gz"
    if content == "gzip":
        with gzip.open(manifest, "wt"):
            pass
    else:
        manifest.write_bytes(content)
    assert corpora(["stats", str(manifest)]) == 2
    line = one_error(capsys.readouterr().err)
    assert line == f"error: manifest {manifest} holds no clips (an empty file); prepare it again"
    assert [p.name for p in tmp_path.iterdir()] == [manifest.name]  # no statistics written


@pytest.mark.parametrize("split", ["train", "valid"])
def test_the_linear_probe_on_an_empty_manifest(tmp_path, synth_corpus, split, capsys):
    import gzip

    from common.models.exports import save_encoder
    from finetune.linear_probe import main as probe

    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt"):
        pass
    manifests = {"train": synth_corpus / "synth_train.jsonl.gz", "valid": synth_corpus / "synth_valid.jsonl.gz",
                 split: empty}
    task = tmp_path / "task.yaml"
    task.write_text(f"name: mine\ntrain: [{manifests['train']}]\nvalid: [{manifests['valid']}]\n"
                    f"classes: {synth_corpus / 'synth_classes.json'}\ntarget_frames: 128\nnorm: audioset\n"
                    f"metric: acc\nloss: ce\n")
    encoder = save_encoder(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=128)),
                           tmp_path / "encoder.safetensors")
    out = tmp_path / "probe.json"
    assert probe(["--init", str(encoder), "--task", str(task), "--cache-dir", str(tmp_path / "cache"),
                  "--out", str(out), "--workers", "0"]) == 2  # bad input
    line = one_error(capsys.readouterr().err)  # checked with every task's files, before any features
    assert line == f"error: task {task}: task.{split}.0: manifest {empty} holds no clips"
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("why", ["a file where its folder goes", "another user's folder"])
def test_a_probe_whose_feature_cache_cannot_be_written_goes_on_with_its_features(tmp_path, synth_corpus, caplog,
                                                                                 monkeypatch, why):
    """A feature cache the probe cannot write (another user's folder, a full disk; here a file where its folder
    would be, or a folder under another user's 0700 home) is said once, and the probe gives its result with the
    features it extracted: it stopped after extracting them all (hours on AudioSet) and gave nothing."""
    import logging

    from common.models.exports import save_encoder
    from finetune.linear_probe import main as probe

    task = tmp_path / "task.yaml"
    task.write_text(f"name: mine\ntrain: [{synth_corpus / 'synth_train.jsonl.gz'}]\n"
                    f"valid: [{synth_corpus / 'synth_valid.jsonl.gz'}]\n"
                    f"classes: {synth_corpus / 'synth_classes.json'}\ntarget_frames: 128\nnorm: audioset\n"
                    f"metric: acc\nloss: ce\n")
    encoder = save_encoder(ASTEncoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, input_tdim=128)),
                           tmp_path / "encoder.safetensors")
    cache = tmp_path / "taken" / "cache"
    if why == "a file where its folder goes":
        (tmp_path / "taken").write_text("a file\n")
        reason = f"{cache}: not a directory"
    else:
        unsearchable(monkeypatch, tmp_path / "taken")
        reason = f"{cache}: permission denied"
    out = tmp_path / "probe.json"
    with caplog.at_level(logging.WARNING, logger="finetune.linear_probe"):
        assert probe(["--init", str(encoder), "--task", str(task), "--cache-dir", str(cache),
                      "--out", str(out), "--workers", "0"]) == 0
    said = [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]
    assert said == [f"feature cache: cannot keep the features in {cache} ({reason}); the probe goes on without the "
                    f"cache, and the next one extracts them again (--cache-dir names a folder it can write)"], said
    assert json.loads(out.read_text())[0]["clips"] == {"train": 24, "valid": 12}


@pytest.mark.slow
def test_an_error_reported_in_one_line_keeps_its_traceback_in_train_log(tmp_path, synth_corpus, monkeypatch, capsys):
    from common.training.loop import Trainer

    def broken(self, stop_after=None):
        raise ValueError("an unforeseen value")

    monkeypatch.setattr(Trainer, "run", broken)
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus) == 2  # a ValueError is bad input (common.cli.run_main)
    err = capsys.readouterr().err
    assert "error: an unforeseen value" in err and "Traceback" not in err  # one line on the console ...
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "in broken" in log  # ... the traceback in the log


def test_a_later_run_in_the_same_process_keeps_its_errors_out_of_the_earlier_runs_log(tmp_path, synth_corpus,
                                                                                      capsys):
    """The demo and a notebook run several runs in one process: a run that fails before it logs into its own
    directory (its directory is busy) wrote its traceback into the previous run's train.log, and failed with a
    FileNotFoundError where that directory was gone."""
    from common.system.lock import run_dir_lock

    first, second = tmp_path / "first", tmp_path / "second"
    assert pretrain(first, synth_corpus, steps=(1, 1)) == 0
    before = (first / "train.log").read_text()
    with run_dir_lock(second):
        assert pretrain(second, synth_corpus, steps=(1, 1)) == 1
    assert "is in use by another run" in capsys.readouterr().err
    assert (first / "train.log").read_text() == before
    shutil.rmtree(first)  # the earlier run's folder is gone
    with run_dir_lock(second):
        assert pretrain(second, synth_corpus, steps=(1, 1)) == 1
    assert capsys.readouterr().err.strip().startswith("error: ")
