"""``train.compile``: compiled steps agree with eager ones, keep the state-dict keys, and resume exactly.

The agreement test compiles with inductor (generated C++ kernels on the CPU; tens of seconds the first
time, the compiled graphs are then cached on disk). The trainer tests use the ``aot_eager`` backend:
the same capture, ahead-of-time autograd and in-place wrapping, without code generation, so that they
take seconds; what they check (the blocks run compiled at every phase, checkpoints and exports keep
their keys, resume is exact) does not depend on the kernels.
"""

import json
from pathlib import Path

import pytest
import torch

from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.training.compile import maybe_compile, repeated_blocks
from pretrain.ssast import SSASTConfig, SSASTModel
from tests.helpers import run, weights

CFG = EncoderConfig(embed_dim=32, depth=2, num_heads=2, num_mel_bins=32, input_tdim=64, fshape=8, tshape=8,
                    fstride=8, tstride=8)


def _losses(model: SSASTModel, steps: int = 3) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, CFG.input_tdim, CFG.num_mel_bins, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(steps):
        loss = model(x, generator)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_repeated_blocks_are_the_transformer_blocks():
    model = SSASTModel(ASTEncoder(CFG), SSASTConfig())
    assert [name for name, _ in repeated_blocks(model)] == ["encoder.blocks.0", "encoder.blocks.1"]
    with pytest.raises(ValueError, match="no repeated blocks"):
        maybe_compile(torch.nn.Linear(2, 2), True)
    with pytest.raises(ValueError, match="train.compile_backend: unknown backend 'tvm'"):
        maybe_compile(model, True, "tvm")
    assert maybe_compile(model, False) is model and model.encoder.blocks[0]._compiled_call_impl is None


def test_the_compile_mode_reaches_every_block_and_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # not this test's concern (below)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    model = SSASTModel(ASTEncoder(CFG), SSASTConfig())
    maybe_compile(model, True, "inductor", "reduce-overhead")
    assert seen == [{"backend": "inductor", "dynamic": False, "mode": "reduce-overhead"}] * 2
    seen.clear()
    maybe_compile(model, True, "aot_eager")
    assert [k["mode"] for k in seen] == [None, None]  # default: torch.compile's own default
    with pytest.raises(ValueError, match="train.compile_mode: 'reduce-overhead' is a mode of the inductor backend"):
        maybe_compile(model, True, "aot_eager", "reduce-overhead")
    with pytest.raises(ValueError, match="train.compile_mode: unknown mode 'fast'"):
        maybe_compile(model, True, "inductor", "fast")


def test_compiling_points_inductor_s_cache_at_a_private_folder(monkeypatch, tmp_path):
    """torch's default inductor cache is ``/tmp/torchinductor_<user>``, whose pickles torch loads: another local user
    who makes it first runs code in the training. A compiling run (before anything compiles) points
    ``TORCHINDUCTOR_CACHE_DIR`` at ``$XDG_CACHE_HOME/coarse2fine/inductor``, mode 0700, also when the variable holds
    torch's default (importing torch._dynamo writes it there); a folder the user set is kept. Nothing compiles here
    (``nn.Module.compile`` only wraps the blocks)."""
    import os
    import stat

    from common.training.compile import _torch_default_cache

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", _torch_default_cache())
    model = SSASTModel(ASTEncoder(CFG), SSASTConfig())
    maybe_compile(model, False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == _torch_default_cache()  # not compiling: left as it is
    maybe_compile(model, True, "aot_eager")
    folder = tmp_path / "xdg" / "coarse2fine" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.stat().st_uid == os.getuid()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice stays
    maybe_compile(model, True, "aot_eager")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_an_inductor_cache_folder_others_can_write_is_refused(monkeypatch, tmp_path):
    """The private folder exists already but others may write it, or it is another user's: refused in one line
    saying what to do, and the variable is not set."""
    import os

    from common.training.compile import private_inductor_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "coarse2fine" / "inductor"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(ValueError, match=rf"^train\.compile: the compile cache {folder} is writable by others \(mode "
                                         rf"777\).* chmod go-w {folder} or set TORCHINDUCTOR_CACHE_DIR"):
        private_inductor_cache()
    folder.chmod(0o755)  # a folder others can read (the user made it so) is kept
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    with pytest.raises(ValueError, match=rf"^train\.compile: the compile cache {folder} belongs to another user"):
        private_inductor_cache()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setattr(os, "getuid", lambda: uid)
    assert private_inductor_cache() == folder and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    # a container run as a bare uid: no HOME, no password entry; one line, not Path.home()'s traceback
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")

    def homeless():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(homeless))
    with pytest.raises(ValueError, match=r"^train\.compile: no home folder for the private compile cache; set "
                                         r"XDG_CACHE_HOME"):
        private_inductor_cache()


def test_a_recipe_with_a_mode_its_backend_lacks_fails_before_compute(tmp_path, synth_corpus, capsys):
    assert run(tmp_path / "run", synth_corpus, "train.compile=true", "train.compile_backend=eager",
               "train.compile_mode=max-autotune") == 2
    assert "train.compile_mode" in capsys.readouterr().err and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_compiled_ssast_steps_agree_with_eager_ones_and_keep_the_state_dict_keys():
    torch.manual_seed(0)
    eager = SSASTModel(ASTEncoder(CFG), SSASTConfig())
    compiled = SSASTModel(ASTEncoder(CFG), SSASTConfig())
    compiled.load_state_dict(eager.state_dict())
    maybe_compile(compiled, True, "inductor")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    a, b = _losses(eager), _losses(compiled)
    # fp32; the generated kernels sum in another order: the losses (~10) agree to 1e-4 relative over 3 Adam steps
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert a[0] != a[-1]  # the steps did train
    fresh = SSASTModel(ASTEncoder(CFG), SSASTConfig())  # an uncompiled model loads the compiled one's weights
    fresh.load_state_dict(compiled.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in compiled.state_dict().items())


@pytest.mark.slow
def test_a_compiled_pretraining_run_compiles_every_phase_and_resumes_exactly(tmp_path, synth_corpus, monkeypatch):
    import common.training.compile

    compiled_models = []
    real = common.training.compile.maybe_compile

    def spy(model, enabled, backend="inductor", mode="default"):
        out = real(model, enabled, backend, mode)
        compiled_models.append(all(b._compiled_call_impl is not None for _, b in repeated_blocks(out)))
        return out

    monkeypatch.setattr("common.training.loop.maybe_compile", spy)
    on = ("train.compile=true", "train.compile_backend=aot_eager", "train.save_every=100")
    straight, resumed, eager = tmp_path / "straight", tmp_path / "resumed", tmp_path / "eager"
    assert run(straight, synth_corpus, *on) == 0
    assert compiled_models == [True, True]  # one compile per phase
    assert run(resumed, synth_corpus, *on, stop=4) == 0
    assert run(resumed, synth_corpus, *on) == 0
    assert compiled_models[2:] == [True, True, True]  # the resumed call compiles its phase again
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run(eager, synth_corpus, "train.save_every=100") == 0  # the same keys as an eager run's export
    c = weights(eager)
    assert c.keys() == a.keys() and all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-5) for k in a)
    ledger = json.loads((straight / "ledger.json").read_text())
    assert [p["steps"] for p in ledger["phases"]] == [3, 3]


@pytest.mark.slow
def test_compiled_fine_tuning_runs_coarse_to_fine(tmp_path, synth_corpus):
    from finetune.run import main as finetune
    from tests.helpers import TINY, _synth_root, sets

    run_dir = tmp_path / "ft"
    assert finetune(["--init", "none", "--task", "synth", "--data-root", str(_synth_root(tmp_path, synth_corpus)),
                     "--run-dir", str(run_dir),
                     *sets(*TINY, "train.compile=true", "train.compile_backend=aot_eager",
                           "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 1}]")
                     ]) == 0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [p["epochs"] for p in ledger["phases"]] == [1, 1] and len(ledger["evals"]) >= 2
    assert (run_dir / "model.safetensors").is_file()
