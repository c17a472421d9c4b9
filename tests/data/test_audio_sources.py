"""A Lhotse ``command`` or ``url`` audio source is never run or fetched, wherever it sits in a cut (an RIR of a
recording's or a mix's transforms, a mix nested in a mix, a Shar tar's JSON member), in this process and in a
loader's workers, forked or spawned (``common.data.lhotse_safety``); such a clip is bad audio, named as refused."""

import io
import json
import logging
import multiprocessing
import re
import tarfile
from pathlib import Path

import pytest
import torch
from lhotse import CutSet, Recording
from lhotse.serialization import deserialize_item

from common.data.clips import ClipDataset
from common.data.decode import BadClip, load_clip
from common.data.lhotse_safety import RefusedAudioSource
from common.data.manifest_lines import count_lines
from common.data.manifests import open_cuts
from tests.layouts import write_clip

REFUSED = "refused (a Lhotse 'command' audio source"


def command(marker: Path, wav: Path, kind: str = "command") -> dict:
    """A Recording whose audio comes from a shell command that would create ``marker`` (or from a URL: a ``url``
    source, or a ``file`` one whose path is a URL, which a backend handing it to ffmpeg would fetch)."""
    source = f"touch {marker}; cat {wav}" if kind == "command" else "http://127.0.0.1:9/rir.wav"
    return {"id": "rir", "sources": [{"type": kind, "channels": [0], "source": source}], "sampling_rate": 16000,
            "num_samples": 800, "duration": 0.05, "channel_ids": [0]}


def reverb(rir: dict) -> dict:
    return {"name": "ReverbWithImpulseResponse", "kwargs": {"rir": rir, "normalize_output": True,
                                                             "early_only": False, "rir_channels": [0],
                                                             "rir_generator": None}}


def mono(cut_id: str, wav: Path, transforms=None) -> dict:
    recording = Recording.from_file(wav, recording_id=f"{cut_id}-rec").to_dict()
    if transforms:
        recording["transforms"] = transforms
    return {"id": cut_id, "start": 0.0, "duration": recording["duration"], "channel": 0, "type": "MonoCut",
            "recording": recording}


def mixed(cut_id: str, track: dict, transforms=None) -> dict:
    cut = {"id": cut_id, "type": "MixedCut", "tracks": [{"cut": track, "type": track["type"]}]}
    if transforms:
        cut["transforms"] = transforms
    return cut


def hidden_commands(tmp_path: Path, kind: str = "command") -> dict[str, dict]:
    """Cuts whose command source hides where ``decode.refused_source`` does not look (the security review's
    three ways), each touching its own marker file if run."""
    wav, rir = write_clip(tmp_path / "a.wav", seconds=0.5), write_clip(tmp_path / "rir.wav", seconds=0.05, seed=1)
    m = {name: tmp_path / f"ran-{name}" for name in ("rir", "mix", "nested")}
    return {
        "rir": mono("rir", wav, [reverb(command(m["rir"], rir, kind))]),
        "mix": mixed("mix", mono("mix-in", wav), [reverb(command(m["mix"], rir, kind))]),
        "nested": mixed("nested", mixed("inner", {**mono("inner-in", wav),
                                                  "recording": command(m["nested"], wav, kind)})),
    }


def ran(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("ran-*"))


@pytest.mark.parametrize("kind, said", [("command", "'command' audio source:"), ("url", "'url' audio source:"),
                                        ("file", "'file' audio source naming a URL:")])
def test_a_source_hidden_in_a_cut_is_refused_not_run(tmp_path, kind, said):
    """The security review ran ``touch`` from an RIR transform's Recording, a MixedCut's transforms and a MixedCut
    nested in a track: each is a bad clip named as refused, the command never run, the URL never opened."""
    for name, item in hidden_commands(tmp_path, kind).items():
        cut = deserialize_item(json.loads(json.dumps(item)))
        with pytest.raises(BadClip, match=rf"^refused \(a Lhotse {said}") as caught:
            load_clip(cut, 16000)
        assert "[extra info]" not in str(caught.value), name
        with pytest.raises(RefusedAudioSource):  # Lhotse's own reading refuses it too (a Shar export, any caller)
            cut.load_audio()
    own = {**mono("own", tmp_path / "a.wav"), "recording": command(tmp_path / "ran-own", tmp_path / "a.wav", kind)}
    with pytest.raises(BadClip, match=rf"^refused \(a Lhotse {said}"):  # on the cut's own recording: named first
        load_clip(deserialize_item(own), 16000)
    assert ran(tmp_path) == []


def _write_manifest(path: Path, items) -> Path:
    CutSet.from_dicts(json.loads(json.dumps(item)) for item in items).to_file(path)
    return path


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_loader_worker_refuses_a_hidden_command(tmp_path, context):
    """A DataLoader worker reads the clips: forked, it inherits the refusal; spawned, it imports the module of its
    dataset (``common.data.clips``), which installs it."""
    items = hidden_commands(tmp_path)
    cuts = open_cuts([_write_manifest(tmp_path / "m.jsonl.gz", items.values())]).to_eager()
    loader = torch.utils.data.DataLoader(ClipDataset(8000, 16000), sampler=[(0, 0, cuts)], batch_size=None,
                                         num_workers=1, multiprocessing_context=context)
    batch = next(iter(loader))
    assert ran(tmp_path) == []
    assert len(batch.bad) == 3 and all(reason.startswith(REFUSED) for _, reason in batch.bad), batch.bad


def test_a_shar_members_command_is_refused(tmp_path):
    """A Shar tar's JSON member is a Recording as a manifest's is: an RIR command put there is refused too."""
    wav = write_clip(tmp_path / "a.wav", seconds=0.5)
    rir = write_clip(tmp_path / "rir.wav", seconds=0.05, seed=1)
    shar = tmp_path / "shar"
    shar.mkdir()
    CutSet.from_cuts([Recording.from_file(wav).to_cut()]).to_shar(shar, fields={"recording": "flac"}, shard_size=10,
                                                                  num_jobs=1)
    tar_path = next(shar.glob("recording.*.tar"))
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            if member.name.endswith(".json"):
                recording = json.loads(data)
                recording["transforms"] = [reverb(command(tmp_path / "ran-shar", rir))]
                data = json.dumps(recording).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    (cut,) = open_cuts([shar])
    with pytest.raises(BadClip, match=rf"^{re.escape(REFUSED)}"):
        load_clip(cut, 16000)
    assert ran(tmp_path) == []


@pytest.mark.parametrize("jobs, start", [(1, None), (2, "fork"), (2, "spawn"), (2, "forkserver")])
def test_a_shar_export_runs_no_command_and_counts_what_it_leaves_out(tmp_path, caplog, monkeypatch, jobs, start):
    """``c2f-corpora shar`` had Lhotse read every clip itself, a plain ``command`` source included (run, then
    skipped), and left clips out with Lhotse's warnings of several lines each and no count: each clip left out is
    one line naming it and why, and the summary counts them. Lhotse's worker processes, spawned (macOS; Python
    3.14's default on Linux is forkserver), are fresh interpreters: they start without Lhotse's shell backends (a
    ``file`` source named ``x; cmd; .sph`` ran ``cmd`` through sph2pipe there) and log as the parent does."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    import lhotse.cut.set

    from common.data.corpora.shar import export_shar

    if start is not None:
        monkeypatch.setattr(lhotse.cut.set, "ProcessPoolExecutor",
                            partial(ProcessPoolExecutor, mp_context=multiprocessing.get_context(start)))

    items = hidden_commands(tmp_path)
    good = [mono(f"good{i}", write_clip(tmp_path / f"good{i}.wav", seconds=0.5, seed=i)) for i in range(2)]
    plain = {**mono("plain", tmp_path / "a.wav"), "recording": command(tmp_path / "ran-plain", tmp_path / "a.wav")}
    plain["recording"].update(num_samples=8000, duration=0.5)
    gone = mono("gone", write_clip(tmp_path / "gone.wav", seconds=0.5))
    (tmp_path / "gone.wav").unlink()
    sph = mono("sph", tmp_path / "a.wav")  # a plain file source whose name sph2pipe's shell command would run
    sph["recording"]["sources"][0]["source"] = f"{tmp_path}/x; touch {tmp_path}/ran-sph; .sph"
    manifest = _write_manifest(tmp_path / "m.jsonl.gz", [*good, plain, *items.values(), gone, sph])
    if start in ("spawn", "forkserver"):  # a log file the workers write too (a forkserver's stderr is its own)
        from common.system.logger import setup_logging

        setup_logging(tmp_path / "logs")
    with caplog.at_level(logging.WARNING):
        done = export_shar(manifest, tmp_path / "shar", shard_size=10, num_jobs=jobs)
    assert ran(tmp_path) == []
    assert done.endswith("; 6 clip(s) left out (4 refused, 2 unreadable: each named above)"), done
    if start in ("spawn", "forkserver"):  # the workers' lines: the package's one line each, with time and level
        logged = (tmp_path / "logs" / "train.log").read_text()
        assert re.search(r"^\S+ \S+ WARNING common\.data\.corpora\.shar: clip gone left out: unreadable \(", logged,
                         re.M), logged
        assert "Skipping" not in logged, logged
    assert sum(count_lines(p) for p in (tmp_path / "shar").glob("cuts.*.jsonl.gz")) == 2
    if jobs == 1:  # a worker process's lines go to its own handlers, not to this test's
        lines = [r.getMessage() for r in caplog.records]
        assert not any("Skipping" in line or "\n" in line for line in lines), lines
        for name in ("plain", *items):
            assert f"clip {name} left out: {REFUSED}" in "\n".join(lines), lines
        assert any(line.startswith("clip gone left out: unreadable (") for line in lines), lines
