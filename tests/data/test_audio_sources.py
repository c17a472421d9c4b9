"""A Lhotse ``command`` or ``url`` audio source is never run or fetched, wherever it sits in a cut (an RIR of a
recording's or a mix's transforms, a mix nested in a mix, a Shar tar's JSON member), in this process and in a
loader's workers, forked or spawned (``common.data.lhotse_safety``); such a clip is bad audio, named as refused."""

import io
import json
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
from common.data.manifests import open_cuts
from tests.layouts import write_clip

REFUSED = "refused (a Lhotse 'command' audio source"


def command(marker: Path, wav: Path, kind: str = "command") -> dict:
    """A Recording whose audio comes from a shell command that would create ``marker`` (or from a URL)."""
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


@pytest.mark.parametrize("kind", ["command", "url"])
def test_a_source_hidden_in_a_cut_is_refused_not_run(tmp_path, kind):
    """The security review ran ``touch`` from an RIR transform's Recording, a MixedCut's transforms and a MixedCut
    nested in a track: each is a bad clip named as refused, the command never run, the URL never opened."""
    for name, item in hidden_commands(tmp_path, kind).items():
        cut = deserialize_item(json.loads(json.dumps(item)))
        with pytest.raises(BadClip, match=rf"^refused \(a Lhotse '{kind}' audio source") as caught:
            load_clip(cut, 16000)
        assert "[extra info]" not in str(caught.value), name
        with pytest.raises(RefusedAudioSource):  # Lhotse's own reading refuses it too (a Shar export, any caller)
            cut.load_audio()
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
