"""Bad audio on one rank of several: a rank whose training batch has no usable clip takes its steps with the
others (a zero gradient), and bad audio is judged on the counts of every rank, so that all ranks stop together
with one message, or none does. Fine-tuning (epoch-based: every epoch end is collective) and pretraining (ZeRO-2,
gradient accumulation) in 2 and 3 processes on gloo; a hang fails after the launch's timeout."""

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from lhotse import CutSet

from common.data.bad_audio import BadAudioTracker
from common.data.config import DataConfig, ManifestSpec
from common.data.loader import train_loader
from tests.helpers import ROOT, rank_error
from tests.ranks import launch_cases

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

BATCH = 4  # clips per rank: data.batch_size, the global batch, is BATCH x ranks (x accumulation)
TINY = ["model.size=custom", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.num_workers=0", "train.log_every=1", "optim.warmup_steps=0", "train.deterministic=true", "train.seed=0"]


def _corpus(synth_corpus: Path, out: Path, world_size: int) -> dict:
    """3 rounds of training batches (12 x ranks clips) and one round of validation batches (4 x ranks), copied as
    WAV files; then the files of the last rank's first training batch (epoch 0, as the loader deals it) and of
    the last rank's validation batch are deleted. Returns the paths, the bad files and the last rank's batch."""
    out.mkdir(parents=True)
    cuts = [c for split in ("train", "test", "valid") for c in CutSet.from_file(synth_corpus / f"synth_{split}.jsonl.gz")]
    n_train, n_valid = 3 * BATCH * world_size, BATCH * world_size
    for cut in cuts[: n_train + n_valid]:
        path = out / f"{cut.id}.wav"
        sf.write(str(path), cut.load_audio()[0], cut.sampling_rate)
        cut.recording.sources[0].source = str(path)
    train, valid = out / "train.jsonl.gz", out / "valid.jsonl.gz"
    CutSet.from_cuts(cuts[:n_train]).to_file(train)
    CutSet.from_cuts(cuts[n_train: n_train + n_valid]).to_file(valid)
    shutil.copy(synth_corpus / "synth_classes.json", out / "classes.json")
    task = out / "task.yaml"
    task.write_text("name: bad\ntrain: [train.jsonl.gz]\nvalid: [valid.jsonl.gz]\nclasses: classes.json\n"
                    "target_frames: 128\nnorm: audioset\nmetric: acc\nloss: ce\n")
    last = world_size - 1
    loader = train_loader(DataConfig(train=[ManifestSpec(str(train))], batch_size=BATCH, num_workers=0), None, 16000,
                          16000, BATCH, 0, last, world_size, BadAudioTracker())
    _, _, first = next(iter(loader.cut_batches(0, 0, 1)))  # the last rank's batch 0 of epoch 0
    bad_train = [str(out / f"{c.id}.wav") for c in first]
    bad_valid = [str(out / f"{c.id}.wav") for c in cuts[n_train + BATCH * last: n_train + n_valid]]
    for path in bad_train + bad_valid:
        Path(path).unlink()
    return {"task": task, "train": train, "bad_train": bad_train, "bad_valid": bad_valid,
            "first": [c.id for c in first], "n_train": n_train, "n_valid": n_valid}


def _finetune(data: dict, run_dir: Path, fraction: float, world_size: int) -> tuple[str, list[str]]:
    sets = TINY + ["phases=[{compression: none, epochs: 2}]", f"data.max_bad_fraction={fraction}",
                   f"data.batch_size={BATCH * world_size}"]
    return "finetune", ["--init", "none", "--task", str(data["task"]), "--run-dir", str(run_dir),
                        *[a for s in sets for a in ("--set", s)]]


def _pretrain(data: dict, run_dir: Path, world_size: int) -> tuple[str, list[str]]:
    sets = TINY[1:] + ["phases=[{compression: none, steps: 2}]", "train.eval_every=2", "train.save_every=2",
                       "baseline=null", "optim.grad_accum=2", f"data.batch_size={BATCH * world_size * 2}", "train.zero_stage=2", "data.max_bad_fraction=0.6",
                       f"data.train=[{{path: {data['train']}}}]", "data.valid=[]"]
    return "pretrain", ["--recipe", str(ROOT / "recipes" / "synth_pretrain.yaml"), "--run-dir", str(run_dir),
                        *[a for s in sets for a in ("--set", s)]]


def _equal_batches(ranks: list[dict]) -> None:
    """Every rank was handed the same number of training batches in each epoch, and of validation batches."""
    for kind in ("train", "valid"):
        per_epoch = [sorted((e, sum(x == e for x, _, _ in r.get(kind, []))) for e in {x for x, _, _ in r.get(kind, [])})
                     for r in ranks]
        assert all(p == per_epoch[0] for p in per_epoch), (kind, per_epoch)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [2, 3])
def test_bad_audio_on_one_rank(synth_corpus, tmp_path, world_size):
    data = _corpus(synth_corpus, tmp_path / "data", world_size)
    runs = tmp_path / "runs"
    valid_share, train_share = BATCH / data["n_valid"], BATCH / data["n_train"]  # 1/W and 1/(3 W) bad
    over_valid = round((valid_share + train_share) / 2, 2)  # tolerates the training set's share, not validation's
    cases = [("tolerated", *_finetune(data, runs / "tolerated", 0.6, world_size)),
             ("valid-over", *_finetune(data, runs / "valid-over", over_valid, world_size)),
             ("train-over", *_finetune(data, runs / "train-over", round(train_share / 2, 2), world_size))]
    if world_size == 2:
        cases.append(("pretrain", *_pretrain(data, runs / "pretrain", world_size)))
    result = launch_cases(world_size, cases, tmp_path / "job", timeout=360, expect={"valid-over": 1, "train-over": 1})

    # every clip of the last rank's first batch was bad: it was handed over empty, and trained on as a step
    ranks = result["tolerated"]
    assert [ids for e, i, ids in ranks[-1]["train"] if (e, i) == (0, 0)] == [[]]
    assert all(r["code"] == 0 and not r["errors"] for r in ranks)
    _equal_batches(ranks)
    ledger = json.loads((runs / "tolerated" / "ledger.json").read_text())
    steps_per_epoch = data["n_train"] // (BATCH * world_size)
    assert ledger["total"]["steps"] == 2 * steps_per_epoch  # all batches made steps, the empty one too
    assert ledger["phases"][0]["samples"] == 2 * (data["n_train"] - BATCH)  # the clips trained on, on all ranks
    assert [e["metrics"]["clips"] for e in ledger["evals"]] == [data["n_valid"] - BATCH] * 2
    header, *lines = (runs / "tolerated" / "bad_audio.tsv").read_text().splitlines()
    assert header == "split\tpath\treason" and sorted(lines) == sorted(
        [f"train\t{p}\tmissing (no such file)" for p in data["bad_train"]]
        + [f"valid\t{p}\tmissing (no such file)" for p in data["bad_valid"]])  # rank 0 lists the others' clips
    ckpt = sorted((runs / "tolerated" / "checkpoints").glob("phase*"))[-1]
    tracker = json.loads((ckpt / "trainer_state.json").read_text())["tracker"]  # the totals of every rank
    assert (tracker["seen"], tracker["bad"]) == (2 * data["n_train"], 2 * BATCH)
    # both validations: the phase-end checkpoint is written again when the phase closes after its own
    assert (tracker["splits"]["valid"]["seen"], tracker["splits"]["valid"]["bad"]) == (2 * data["n_valid"], 2 * BATCH)
    assert ledger["bad_audio"] == {  # the same totals, where the user reads them
        "train": {"seen": 2 * data["n_train"], "bad": 2 * BATCH, "reasons": {"missing": 2 * BATCH}},
        "valid": {"seen": 2 * data["n_valid"], "bad": 2 * BATCH, "reasons": {"missing": 2 * BATCH}}}

    # over the threshold: every rank stops at the same point with the same message (the totals of all ranks)
    for name, bad, seen, fraction, split in (("valid-over", BATCH, data["n_valid"], over_valid, " (valid)"),
                                             ("train-over", BATCH, data["n_train"], round(train_share / 2, 2), "")):
        ranks = result[name]
        message = (f"error: {bad} of {seen} clips ({bad / seen:.1%}) could not be used{split}, more than "
                   f"max_bad_fraction={fraction:.1%}")
        assert all(r["code"] == 1 and len(r["errors"]) == 1 and r["errors"][0].startswith(rank_error(i, message))
                   for i, r in enumerate(ranks)), (name, [r["errors"] for r in ranks])
        assert len({r["errors"][0].replace(rank_error(i, "error: "), "") for i, r in enumerate(ranks)}) == 1
        _equal_batches(ranks)

    if world_size == 2:  # step-based, ZeRO-2 and 2 micro-batches per step: the empty batch's gradient is reduced
        ranks = result["pretrain"]
        assert [ids for e, i, ids in ranks[-1]["train"] if (e, i) == (0, 0)] == [[]]
        assert all(len(r["train"]) == 2 * 2 for r in ranks)  # 2 steps x 2 micro-batches
        ledger = json.loads((runs / "pretrain" / "ledger.json").read_text())
        trained = sum(len(ids) for r in ranks for _, _, ids in r["train"])  # the usable clips handed over
        assert ledger["total"]["steps"] == 2 and ledger["phases"][0]["samples"] == trained <= 2 * 2 * 2 * BATCH - BATCH
