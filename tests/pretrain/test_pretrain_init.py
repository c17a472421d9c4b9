"""Continued pretraining (``pretrain/run.py --init``): from an official SSAST checkpoint with its pretext heads,
from this package's run and export, from an ImageNet ViT; short clips; refusals; a resume without the file."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from common.cli import PLAN_NOT_READY
from common.config.recipe import RecipeError
from common.models.ast.resize import resample_pos_embed
from common.models.exports import read_weights
from common.phases.transition import initial_model
from pretrain.init import load_start
from pretrain.recipe import load_recipe
from pretrain.run import main
from pretrain.ssast import SSASTObjective
from tests.helpers import RECIPE, rank_error, ssast_pretrained_state, tiny

pytestmark = pytest.mark.slow  # end-to-end: every test here trains, launches or exports

HEAD_KEYS = [f"{h}.{i}.{p}" for h in ("cpredlayer", "gpredlayer") for i in (0, 2) for p in ("weight", "bias")]


def official_ssast(tmp_path: Path, dim: int = 32) -> tuple[Path, dict]:
    """A tiny SSAST pretraining checkpoint in the official layout (16 x 16 patches, 128 x 256 input: 8 x 16 grid)."""
    sd = ssast_pretrained_state(dim=dim, depth=2, tdim=256)
    path = tmp_path / "SSAST-Tiny-Patch-400.pth"
    torch.save(sd, path)
    return path, sd


def overrides(corpus: Path, *extra: str, steps=(2, 2)) -> list[str]:
    return tiny(corpus, "train.deterministic=false", *extra, steps=steps)


def pretrain(run_dir: Path, corpus: Path, init: Path | None, *extra: str, stop=None, dry=False) -> int:
    argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), *overrides(corpus, *extra)]
    argv += ["--init", str(init)] if init is not None else []
    argv += ["--stop-after-steps", str(stop)] if stop is not None else []
    return main(argv + (["--dry-run"] if dry else []))


def recipe_of(corpus: Path, *extra: str):
    sets = overrides(corpus, *extra)
    return load_recipe(RECIPE, [s for s in sets if s != "--set"])


def first_model(start, recipe):
    """The first phase's model exactly as the trainer builds it at step 0."""
    objective = SSASTObjective(recipe.ssast, start.heads)
    from common.models.arch import architecture_for

    arch = architecture_for(recipe.base, recipe.audio)
    return initial_model(arch, objective, recipe.encoder_configs()[0], recipe.phases[0], recipe.train.seed,
                         start.weights, start.pos_mode)


def ledger(run_dir: Path) -> dict:
    return json.loads((run_dir / "ledger.json").read_text())


def test_an_official_ssast_checkpoint_continues_coarse_to_fine_with_its_heads(tmp_path, synth_corpus, capsys):
    path, sd = official_ssast(tmp_path)
    recipe = recipe_of(synth_corpus)
    start = load_start(str(path), recipe)
    model = first_model(start, recipe)
    state = model.state_dict()
    # at step 0 the heads and the mask embedding are the file's; the positional embedding is the file's centre
    # columns for the full-resolution grid (SSAST's rule for a shorter input, 16 -> 8 time columns), carried to the
    # x4 phase's 2 columns as a phase change carries it (bilinear), not the centre 2 of the file's 16
    for key in HEAD_KEYS + ["mask_embed"]:
        assert torch.equal(state[key], sd[f"module.{key}"]), key
    full = sd["module.v.pos_embed"][:, 2:].reshape(1, 8, 16, 32)[:, :, 4:12]
    expected = resample_pos_embed(torch.cat([sd["module.v.pos_embed"][:, :2], full.reshape(1, 64, 32)], 1), (8, 8),
                                  (8, 2), 2, "bilinear")
    assert torch.allclose(state["encoder.pos_embed"], expected, atol=1e-6)
    assert torch.equal(state["encoder.blocks.1.mlp.fc2.weight"], sd["module.v.blocks.1.mlp.fc2.weight"])
    # the plan says every decision, one line each
    assert pretrain(tmp_path / "plan", synth_corpus, path, dry=True) == 0
    out = capsys.readouterr().out
    assert "init: positional embedding 8x16 -> 8x8 at full resolution (cut: the rule of the file's code), then -> " \
           "8x2 for the first phase (bilinear, as a phase change)" in out
    assert "init: cpredlayer (the MPC head) kept from the file" in out and "mask_embed (the mask embedding) kept" in out
    assert not (tmp_path / "plan").exists()
    # the run: stopped after one step, the file removed, resumed: the run needs its checkpoints only
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, path, stop=1) == 0
    weights = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())  # which weights, by content
    moved = tmp_path / "elsewhere.pth"
    shutil.move(path, moved)
    assert pretrain(run_dir, synth_corpus, path) == 0
    assert (run_dir / "model.safetensors").is_file()
    record = ledger(run_dir)["init"]
    assert (record["source"], record["kind"], record["format"]) == (str(path), "ssast", "official")
    assert (record["size"], record["sha256"]) == weights
    assert record["kept"] == ["cpredlayer", "gpredlayer", "mask_embed"] and record["fresh"] == []
    assert record["pos_embed"] == {"from": [8, 16], "to": [8, 2], "mode": "cut_at_full"}
    log = (run_dir / "train.log").read_text()
    assert "init: gpredlayer (the MPG head) kept from the file" in log
    assert f"--init {path} is not read: the run resumes from its checkpoints (it started from {path})" in log
    assert [p["steps"] for p in ledger(run_dir)["phases"]] == [2, 2]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, synth_corpus):
    """This package's pretraining run from scratch (2 + 2 steps)."""
    run_dir = tmp_path_factory.mktemp("own") / "run"
    assert pretrain(run_dir, synth_corpus, None) == 0
    return run_dir


def test_own_exports_carry_the_pretext_heads(own_run):
    tensors, meta = read_weights(own_run / "model.safetensors")
    assert meta["encoder_prefix"] == "encoder." and meta["objective"] == "ssast"
    assert set(HEAD_KEYS + ["mask_embed"]) <= set(tensors)
    from common.models.weights import load_encoder

    assert load_encoder(own_run).cfg.grid == (8, 8)  # what fine-tuning's --init reads is unchanged


def test_continuing_from_this_packages_run_and_its_export(tmp_path, synth_corpus, own_run):
    recipe = recipe_of(synth_corpus)
    # the phase-1 export: the same 8 x 2 grid as the first phase, every part kept as it was
    export = own_run / "export" / "phase1.safetensors"
    tensors, _ = read_weights(export)
    start = load_start(str(export), recipe)
    state = first_model(start, recipe).state_dict()
    assert all(torch.equal(state[k], tensors[k]) for k in tensors), "a phase-1 export starts phase 1 unchanged"
    assert start.record["pos_embed"]["mode"] is None and start.record["kept"] == ["cpredlayer", "gpredlayer",
                                                                                    "mask_embed"]
    # the run directory (its final 8 x 8 model, fitted to 8 x 2 with transfer.pos_embed), end to end
    run_dir = tmp_path / "again"
    assert pretrain(run_dir, synth_corpus, own_run) == 0
    record = ledger(run_dir)["init"]
    assert (record["kind"], record["format"], record["kept"]) == ("ssast", "export",
                                                                  ["cpredlayer", "gpredlayer", "mask_embed"])
    assert record["pos_embed"] == {"from": [8, 8], "to": [8, 2], "mode": "bilinear"}
    start = load_start(str(own_run), recipe)
    final, _ = read_weights(own_run / "model.safetensors")
    assert all(torch.equal(start.heads[k], final[k]) for k in HEAD_KEYS)


def test_an_imagenet_vit_starts_with_fresh_heads(tmp_path, synth_corpus):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    path = tmp_path / "vit_tiny_imagenet.pth"
    torch.save(vit.state_dict(), path)
    # one prefix token (no distillation token): the recipe must say so, and the refusal says how
    with pytest.raises(RecipeError, match=r"num_prefix_tokens 1.*--set model.num_prefix_tokens=1"):
        load_start(str(path), recipe_of(synth_corpus))
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, path, "model.num_prefix_tokens=1") == 0
    record = ledger(run_dir)["init"]
    assert (record["kind"], record["format"]) == ("imagenet", "imagenet")
    assert record["fresh"] == ["cpredlayer", "gpredlayer", "mask_embed"] and record["kept"] == []
    assert record["pos_embed"] == {"from": [4, 4], "to": [8, 2], "mode": "cut"}
    assert "init: cpredlayer (the MPC head) starts afresh: an ImageNet start" in (run_dir / "train.log").read_text()


def test_an_official_ast_checkpoint_has_no_heads_to_keep(tmp_path, synth_corpus):
    sd = ssast_pretrained_state(dim=32, depth=2)
    for key in [k for k in sd if "pred" in k or "p_input" in k or "mask_embed" in k]:
        del sd[key]
    sd["module.v.pos_embed"] = torch.randn(1, 12 * 12 + 2, 32)  # AST: stride 10, 12 x 12 grid
    sd["module.mlp_head.1.weight"] = torch.randn(527, 32)
    torch.save(sd, tmp_path / "audioset_10_10.pth")
    recipe = recipe_of(synth_corpus)
    start = load_start(str(tmp_path / "audioset_10_10.pth"), recipe)
    assert (start.record["kind"], start.record["fresh"], start.heads) == \
        ("ast", ["cpredlayer", "gpredlayer", "mask_embed"], {})
    model = first_model(start, recipe)
    torch.manual_seed(recipe.train.seed)  # the seed initial_model builds the first phase's model with
    fresh = SSASTObjective(recipe.ssast).build_model(recipe.encoder_configs()[0])
    assert torch.equal(model.cpredlayer[2].weight, fresh.cpredlayer[2].weight)  # the seeded fresh init


def test_heads_follow_a_patch_phase_and_a_changed_input(tmp_path, synth_corpus):
    path, sd = official_ssast(tmp_path)
    # a first phase with 16 x 64 patches (patch compression x4): the kernel resized as the phase's patch_transfer
    # says, the heads' outputs resized as at a patch-phase change
    recipe = recipe_of(synth_corpus, "phases.0.compression=patch", "phases.0.patch_transfer=pi")
    start = load_start(str(path), recipe)
    assert start.record["patch_embed"] == {"from": [16, 16], "to": [16, 64], "mode": "pi"}
    assert start.record["heads"]["cpredlayer"] == "kept, resized 16x16 -> 16x64"
    model = first_model(start, recipe)
    assert model.cpredlayer[2].weight.shape == (16 * 64, 32)
    assert torch.equal(model.cpredlayer[0].weight, sd["module.cpredlayer.0.weight"])
    assert torch.equal(model.mask_embed, sd["module.mask_embed"])


def test_short_clips_plan_and_run_with_the_models_input_length(tmp_path, synth_corpus, capsys):
    """The built-in corpus's 0.8-2 s clips under SSAST's 10.24 s input: the plan says so and names the setting;
    with it, continued pretraining from the official checkpoint runs."""
    path, _ = official_ssast(tmp_path)
    assert pretrain(tmp_path / "plan", synth_corpus, path, "audio.target_frames=1024", dry=True) == 0
    out = capsys.readouterr().out
    assert "clips: the model's input is 10.26 s (audio.target_frames 1024); shorter clips are zero-padded" in out
    assert "clips: data.train.0 (synth_pool.jsonl.gz): 0.95-1.94 s, median 1.39 s (first 24 clips)" in out
    line = next(line for line in out.splitlines() if line.startswith("warning: data.train.0"))
    frames = int(line.split("audio.target_frames=")[1].split()[0])
    assert "most of each input is padding" in line and "data.pad=repeat" in line
    assert frames == 192  # 1.39 s needs 138 frames; 144 and 160 give 9 and 10 time columns, which x4 does not divide
    # the plan with that setting has nothing to warn about, and the run works from the official checkpoint
    assert pretrain(tmp_path / "plan", synth_corpus, path, f"audio.target_frames={frames}", dry=True) == 0
    out = capsys.readouterr().out
    assert "warning: data.train.0" not in out and "positional embedding 8x16 -> 8x12 at full resolution (cut" in out
    run_dir = tmp_path / "run"
    assert pretrain(run_dir, synth_corpus, path, f"audio.target_frames={frames}") == 0
    assert ledger(run_dir)["init"]["pos_embed"] == {"from": [8, 16], "to": [8, 3], "mode": "cut_at_full"}
    from common.models.weights import load_encoder

    assert load_encoder(run_dir).cfg.grid == (8, 12)
    # repeating the clips is the other setting: the plan says it
    assert pretrain(tmp_path / "plan", synth_corpus, None, "audio.target_frames=1024", "data.pad=repeat",
                    dry=True) == 0
    out = capsys.readouterr().out
    assert "shorter clips are repeated to it (data.pad: repeat)" in out and "warning: data.train.0" not in out


def _htsat_checkpoint(tmp_path: Path) -> Path:
    from tests.helpers import official_state, save_lightning

    path = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    save_lightning(official_state(), path)
    return path


@pytest.mark.parametrize("case,message", [
    ("htsat", "holds an htsat model (HTS-AT, a Swin transformer); SSAST pretraining continues a ViT encoder"),
    ("dim", "the file's encoder has embed_dim 64, the recipe's model embed_dim 32; train the file's transformer "
            "with --set model.embed_dim=64 --set model.depth=2 --set model.num_heads=1"),
    ("junk", "not a usable start"),
])
def test_a_file_that_is_not_a_usable_start_is_refused_in_one_line(tmp_path, synth_corpus, capsys, case, message):
    if case == "htsat":
        path = _htsat_checkpoint(tmp_path)
    elif case == "dim":
        path, _ = official_ssast(tmp_path, dim=64)
    else:
        path = tmp_path / "notes.pth"
        path.write_text("not a checkpoint")
    for dry in (True, False):
        run_dir = tmp_path / f"run{dry}"
        assert pretrain(run_dir, synth_corpus, path, dry=dry) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --init {path}") and message in err and len(err.splitlines()) == 1, err
        assert not run_dir.exists()


def test_a_plan_before_the_init_exists_lists_it(tmp_path, synth_corpus, capsys):
    missing = tmp_path / "not_yet.pth"
    assert pretrain(tmp_path / "plan", synth_corpus, missing, dry=True) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert "files a run needs and does not find" in out and f"--init: checkpoint {missing} does not exist" in out
    assert pretrain(tmp_path / "run", synth_corpus, missing) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_starts_from_the_file(tmp_path, synth_corpus, ranks):
    from tests.ranks import launch_cases

    path, _ = official_ssast(tmp_path)
    run_dir = tmp_path / "ddp"
    argv = ["--recipe", str(RECIPE), "--run-dir", str(run_dir), "--init", str(path),
            *overrides(synth_corpus, "data.batch_size=6", steps=(1, 1))]
    launch_cases(ranks, [("init", "pretrain", argv)], tmp_path / "job", timeout=240)
    record = ledger(run_dir)["init"]
    assert record["kept"] == ["cpredlayer", "gpredlayer", "mask_embed"]
    assert [p["world_size"] for p in ledger(run_dir)["phases"]] == [ranks, ranks]
    assert (run_dir / "train.log").read_text().count("init: cpredlayer (the MPC head) kept from the file") == 1


@pytest.mark.parametrize("ranks", [2, 3])
def test_on_several_ranks_a_run_whose_checkpoints_were_deleted_is_complete_or_refused_by_every_rank(tmp_path,
                                                                                                  synth_corpus,
                                                                                                  ranks):
    """The deleted-checkpoints decision on 2 and 3 ranks (rank 0 reads the run directory for every rank once the
    group exists; each rank reads it before): a finished run is complete on every rank (nothing trained or
    replaced, no rank waiting for another), an unfinished one is refused by every rank in the same one line, at
    once. The plan's cautions (here a warm-up longer than the phases) are said by rank 0 only."""
    from tests.ranks import launch_cases

    def argv(run_dir: Path, *extra: str) -> list[str]:
        return ["--recipe", str(RECIPE), "--run-dir", str(run_dir),
                *overrides(synth_corpus, f"data.batch_size={2 * ranks}", "optim.warmup_steps=3"), *extra]

    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    cases = [("finished", "pretrain", argv(finished)), ("finished-again", "pretrain", argv(finished)),
             ("unfinished", "pretrain", argv(unfinished, "--stop-after-steps", "1")),
             ("unfinished-again", "pretrain", argv(unfinished))]
    result = launch_cases(ranks, cases, tmp_path / "job", timeout=300, expect={"unfinished-again": 1},
                          remove={"finished-again": finished / "checkpoints",
                                  "unfinished-again": unfinished / "checkpoints"})
    assert all(r["errors"] == [] for r in result["finished-again"])
    assert ledger(finished)["total"]["steps"] == 4 and (finished / "model.safetensors").is_file()
    assert not (finished / "checkpoints").exists()  # nothing trained again, so nothing saved
    log = (finished / "train.log").read_text()
    assert log.count(f"{finished / 'checkpoints'} holds no checkpoint (deleted?), but its run is finished") == 1
    lost = (f"error: {unfinished} holds a run that trained (ledger.json) and is unfinished, but no checkpoint to "
            f"resume it from ({unfinished / 'checkpoints'} is gone or empty); run with --restart to start from step 0 "
            f"(what the run left is moved aside), or use a new --run-dir")
    assert [r["errors"] for r in result["unfinished-again"]] == [[rank_error(i, lost)] for i in range(ranks)]
    assert not (unfinished / "checkpoints").exists() and ledger(unfinished)["total"]["steps"] == 1
    logs = [(tmp_path / "job" / f"rank{r}.log").read_text() for r in range(ranks)]
    said = [[text.count("steps end inside the learning-rate warm-up"), text.count("holds no checkpoint (deleted?)")]
            for text in logs]
    # the cautions for each phase of each training case and the finished run's warning: rank 0 only
    assert said[0][0] >= 2 and said[0][1] == 1 and said[1:] == [[0, 0]] * (ranks - 1), said


def test_an_export_of_a_bilinear_patch_phase_leaves_it_by_that_transfer_and_says_so(synth_corpus, monkeypatch):
    """A p x Cp export of a ``patch_transfer: bilinear`` phase continued into a frame-shift phase: its kernel leaves
    the patch phase by bilinear resizing, as the run's own phase change would have, and the plan line and the
    ledger's ``init.patch_embed.mode`` say bilinear (they said pi, the default, while the kernel was resized
    bilinearly)."""
    from common.audio.compression import Compression
    from common.models.ast.encoder import ASTEncoder
    from common.models.ast.resize import resample_patch_kernel
    from common.models.weights import EncoderWeights
    from pretrain import init as init_module

    recipe = recipe_of(synth_corpus)
    coarse = Compression("patch", 4, "bilinear").encoder_config(recipe.base)
    torch.manual_seed(0)
    state = ASTEncoder(coarse).state_dict()
    weights = EncoderWeights(coarse, state, {"source": "export", "objective": "ssast", "file": "phase1.safetensors",
                                             "phase": {"index": 1, "of": 2, "compression": "patch", "factor": 4,
                                                       "patch_transfer": "bilinear"}})
    monkeypatch.setattr(init_module, "load_init", lambda arg: weights)
    monkeypatch.setattr(init_module, "init_digest", lambda arg: {"files": [arg], "size": 0, "sha256": "0" * 64})
    start = load_start("phase1.safetensors", recipe)
    assert start.record["patch_embed"] == {"from": [16, 64], "to": [16, 16], "mode": "bilinear"}
    assert any("(bilinear-resized" in line for line in start.lines), start.lines
    kernel = first_model(start, recipe).encoder.patch_embed.proj.weight.detach()
    assert torch.equal(kernel, resample_patch_kernel(state["patch_embed.proj.weight"], (16, 16), "bilinear"))


def _files(run_dir: Path) -> dict:
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and (p.name.endswith(".safetensors") or p.name in ("ledger.json", "recipe.yaml"))}


def test_a_run_whose_checkpoints_were_deleted_is_not_trained_again(tmp_path, synth_corpus, own_run, capsys):
    """RUN/checkpoints deleted to free disk. A finished run is complete: the command and its plan say so, --init is
    not read and nothing is replaced (the run used to start again from step 0, from random weights, replacing the
    model, the exports and the ledger with its init record). An unfinished one is refused in one line naming
    --restart, which then starts it from --init."""
    import shutil

    finished = tmp_path / "finished"
    assert pretrain(finished, synth_corpus, own_run) == 0
    shutil.rmtree(finished / "checkpoints")
    before = _files(finished)
    capsys.readouterr()
    assert pretrain(finished, synth_corpus, own_run, dry=True) == 0
    out = capsys.readouterr().out
    assert f"{finished} holds a finished run; this command has nothing left to train" in out
    assert f"--init {own_run} is not read: {finished} is finished (nothing left to train)" in out
    assert pretrain(finished, synth_corpus, own_run) == 0
    assert _files(finished) == before and ledger(finished)["init"]["source"] == str(own_run)
    log = (finished / "train.log").read_text()
    assert f"{finished / 'checkpoints'} holds no checkpoint (deleted?), but its run is finished" in log
    assert f"--init {own_run} is not read: the run is finished" in log

    unfinished = tmp_path / "unfinished"
    assert pretrain(unfinished, synth_corpus, own_run, stop=2) == 0
    shutil.rmtree(unfinished / "checkpoints")
    before = _files(unfinished)
    capsys.readouterr()
    assert pretrain(unfinished, synth_corpus, own_run) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: {unfinished} holds a run that trained (ledger.json) and is unfinished, but no checkpoint "
                   f"to resume it from ({unfinished / 'checkpoints'} is gone or empty); run with --restart to start "
                   f"from step 0 (what the run left is moved aside), or use a new --run-dir"], err
    assert _files(unfinished) == before
    assert pretrain(unfinished, synth_corpus, own_run, dry=True) == PLAN_NOT_READY
    out = capsys.readouterr().out
    assert f"{unfinished} holds a run whose checkpoints are gone; this command refuses it" in out
    assert f"{unfinished} holds a run that trained (ledger.json) and is unfinished" in out
    assert main(["--recipe", str(RECIPE), "--run-dir", str(unfinished), *overrides(synth_corpus), "--init",
                 str(own_run), "--restart"]) == 0
    assert ledger(unfinished)["init"]["source"] == str(own_run) and (unfinished / "model.safetensors").is_file()

    # a run stopped after a validation but before its first checkpoint (no recipe.yaml: none was ever written)
    # starts again from step 0, as it always did (its ledger alone is no lost run; a requeue loop goes on)
    early = tmp_path / "early"
    assert pretrain(early, synth_corpus, own_run, stop=2) == 0
    shutil.rmtree(early / "checkpoints")
    (early / "recipe.yaml").unlink()
    assert pretrain(early, synth_corpus, own_run) == 0 and (early / "model.safetensors").is_file()

    # only what a save killed at the first checkpoint left: nothing is resumed, so --init is read
    killed = tmp_path / "killed"
    (killed / "checkpoints" / ".tmp-phase01-step000000002").mkdir(parents=True)
    assert pretrain(killed, synth_corpus, own_run) == 0
    assert ledger(killed)["init"]["source"] == str(own_run)
