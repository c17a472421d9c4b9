"""The whole main job on the built-in corpus, in a few minutes on 2 CPU cores (``make demo``).

1. Generate the synth corpus (12 sound classes, unlabeled pool + labeled splits).
2. SSAST pretraining, coarse to fine (``recipes/synth_pretrain.yaml``: 1/8 of the baseline's steps at
   Fshift x4, then 5/8 at full resolution, the paper's SSAST proportions) and its baseline (every step at
   full resolution, ``recipes/synth_pretrain_baseline.yaml``).
3. Fine-tuning on the synth task: from both pretrained encoders at full resolution, and from the
   coarse-to-fine encoder with coarse-to-fine fine-tuning (``recipes/ft_synth_fshift4.yaml``).
4. Linear probing of both pretrained encoders.
5. The savings reports (paper Table 2 rule) with plots of the metric against training FLOPs.
6. The Hugging Face export: the comparisons above fine-tune with mean pooling (SSAST's), which the Hugging
   Face AST format cannot hold, so the coarse-to-fine encoder is fine-tuned once more with prefix
   (cls + dist) pooling; its best epoch is exported to ``demo_out/hf/`` as an
   ``ASTForAudioClassification`` and one test clip is classified through ``transformers``'
   ``audio-classification`` pipeline.
7. HTS-AT (a tiny Swin, paper section 3.5) fine-tuned from scratch at full resolution
   (``recipes/synth_htsat.yaml``) and coarse to fine (``recipes/ft_synth_htsat_fshift4.yaml``).

Everything goes under ``--out`` (default ``demo_out/``); re-running skips the finished steps (each run
resumes or finds itself complete).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.config.recipe import bundled_recipes

# Imports the command alone needs are inside its functions: --help answers without loading torch.

RECIPES = bundled_recipes() or Path(__file__).resolve().parents[1] / "recipes"  # a clone's, or a wheel's copy


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _step(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run(out: Path, quick: bool = False) -> dict:
    """Run the demo into ``out``; returns the paths of its results. ``quick``: tiny sizes (tests)."""
    from common.data.corpora import get_corpus
    from common.reports.report import main as report
    from common.system.atomic import atomic_write_text
    from finetune.linear_probe import main as probe
    from finetune.run import main as finetune
    from pretrain.run import main as pretrain

    data = out / "data"
    start = time.perf_counter()
    t = _step("1/7 the built-in corpus")
    if not (data / "synth" / "synth_classes.json").is_file():
        get_corpus("synth").prepare(None, data / "synth", size="test" if quick else "demo")
    print(f"data/synth ready ({time.perf_counter() - t:.0f} s)")

    pool, valid = (json.dumps(str(data / "synth" / name)) for name in ("synth_pool.jsonl.gz", "synth_valid.jsonl.gz"))
    common = _sets(f"data.train=[{{path: {pool}}}]", f"data.valid=[{valid}]")  # quoted: --out may hold '#' or ', '

    if quick:
        common += _sets("model.embed_dim=32", "model.depth=2", "model.num_heads=2", "data.batch_size=4",
                        "data.num_workers=0", "train.eval_every=2", "train.save_every=100", "train.log_every=2")
    runs = {"c2f": (RECIPES / "synth_pretrain.yaml", ["phases.0.steps=1", "phases.1.steps=5"]),
            "baseline": (RECIPES / "synth_pretrain_baseline.yaml", ["phases.0.steps=8"])}
    for name, (recipe, quick_steps) in runs.items():
        t = _step(f"2/7 pretraining ({'coarse to fine' if name == 'c2f' else 'baseline, full resolution'})")
        argv = ["--recipe", str(recipe), "--run-dir", str(out / "pretrain" / name), *common]
        if quick:
            argv += _sets(*quick_steps, "baseline=null")
        if pretrain(argv) != 0:
            raise RuntimeError(f"pretraining {name} failed")
        print(f"({time.perf_counter() - t:.0f} s)")

    ft_common = ["--task", "synth", "--data-root", str(data)]
    if quick:
        ft_common += _sets("model.embed_dim=32", "data.batch_size=4", "data.num_workers=0", "train.log_every=2",
                           "phases=[{compression: fshift, factor: 4, epochs: 1}, {compression: none, epochs: 1}]")
    finetunes = {
        "from_baseline": (out / "pretrain" / "baseline", None),
        "from_c2f": (out / "pretrain" / "c2f", None),
        "from_c2f_fshift4": (out / "pretrain" / "c2f", RECIPES / "ft_synth_fshift4.yaml"),
    }
    for name, (init, recipe) in finetunes.items():
        t = _step(f"3/7 fine-tuning {name.replace('_', ' ')}")
        argv = ["--init", str(init), *ft_common, "--run-dir", str(out / "finetune" / name)]
        if recipe is not None:
            argv += ["--recipe", str(recipe)]
        elif quick:
            argv += _sets("phases=[{compression: none, epochs: 2}]")
        if finetune(argv) != 0:
            raise RuntimeError(f"fine-tuning {name} failed")
        print(f"({time.perf_counter() - t:.0f} s)")

    t = _step("4/7 linear probes of the pretrained encoders")
    probes = {}
    for name in ("baseline", "c2f"):
        result = out / f"probe_{name}.json"
        if probe(["--init", str(out / "pretrain" / name), "--task", "synth", "--data-root", str(data),
                  "--cache-dir", str(out / "probe_cache"), "--workers", "0" if quick else "1",
                  "--out", str(result)]) != 0:
            raise RuntimeError(f"linear probe of {name} failed")
        probes[name] = json.loads(result.read_text())[0]["value"]
    print(f"({time.perf_counter() - t:.0f} s)")

    t = _step("5/7 savings reports")
    for kind, baseline, runs_, names in (
        ("pretrain", out / "pretrain" / "baseline", [out / "pretrain" / "c2f"], ["SSAST Fshift 4→1"]),
        ("finetune", out / "finetune" / "from_baseline",
         [out / "finetune" / "from_c2f", out / "finetune" / "from_c2f_fshift4"],
         ["c2f-pretrained", "c2f-pretrained, Fshift 4→1 fine-tuning"]),
    ):
        if report(["--baseline", str(baseline), "--runs", *map(str, runs_), "--names", *names,
                   "--out", str(out / f"report_{kind}")]) != 0:
            raise RuntimeError(f"the {kind} report failed")
    t = _step("6/7 Hugging Face export (fine-tuning with prefix pooling, the pooling the format holds)")
    argv = ["--init", str(out / "pretrain" / "c2f"), *ft_common, "--run-dir", str(out / "finetune" / "for_hf"),
            *_sets("head.pool=prefix")]
    if finetune(argv + (_sets("phases=[{compression: none, epochs: 2}]") if quick else [])) != 0:
        raise RuntimeError("fine-tuning for the Hugging Face export failed")
    hf = export_to_hf(out / "finetune" / "for_hf", data, out / "hf")
    print(f"({time.perf_counter() - t:.0f} s)")
    for name, recipe in (("htsat_baseline", "synth_htsat.yaml"), ("htsat_fshift4", "ft_synth_htsat_fshift4.yaml")):
        t = _step(f"7/7 HTS-AT (a tiny Swin) {'coarse to fine' if 'fshift' in name else 'at full resolution'}")
        argv = ["--init", "none", "--task", "synth", "--data-root", str(data), "--recipe", str(RECIPES / recipe),
                "--run-dir", str(out / "finetune" / name)]
        if quick:  # 2 epochs (coarse to fine: 1 + 1)
            argv += _sets("data.batch_size=4", "data.num_workers=0", "train.log_every=2",
                          "phases=[{compression: none, epochs: 2}]")
        if finetune(argv) != 0:
            raise RuntimeError(f"HTS-AT fine-tuning {name} failed")
        print(f"({time.perf_counter() - t:.0f} s)")
    summary = summarise(out, probes)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s.\n\n{summary}\nResults under {out}/:")
    atomic_write_text(out / "summary.md", summary)
    results = {"reports": [str(out / f"report_{k}" / "report.md") for k in ("pretrain", "finetune")],
               "plots": [str(out / f"report_{k}" / "report.png") for k in ("pretrain", "finetune")],
               "probes": probes, "summary": str(out / "summary.md"), "hf": hf}
    for path in [results["summary"]] + results["reports"] + results["plots"]:
        print(f"  {path}")
    print(f"  TensorBoard: tensorboard --logdir {out}")
    return results


def export_to_hf(run: Path, data: Path, target: Path) -> dict:
    """Export the best epoch of the fine-tuning run ``run`` to ``target`` as a Hugging Face AST directory
    and classify one test clip through ``transformers``' pipeline (skipped, saying how to install it,
    without ``transformers``)."""
    import soundfile as sf

    from common.models.exports import read_weights
    from common.models.hf import TransformersMissing
    from common.models.hf_export import classify, export_hf

    best = run / "export" / "best.safetensors"
    accuracy = read_weights(best)[1]["eval"]["metrics"]["acc"]
    clip = sorted((data / "synth" / "synth_audio" / "test").glob("*.flac"))[0]
    wave, rate = sf.read(clip, dtype="float32")
    try:
        hf_dir = export_hf(best, target)
        top = classify(hf_dir, wave, rate, top_k=3)
    except TransformersMissing as err:
        print(f"skipped: {err}")
        return {}
    except ValueError as err:
        raise RuntimeError(f"the Hugging Face export failed: {err}") from err
    print(f"exported {best} (validation accuracy {100 * accuracy:.1f} %) to {hf_dir}/")
    print(f"transformers pipeline('audio-classification') on {clip.name}:")
    for item in top:
        print(f"  {item['score']:.3f}  {item['label']}")
    return {"dir": str(hf_dir), "accuracy": accuracy, "clip": str(clip), "top": top}


def summarise(out: Path, probes: dict) -> str:
    """What the coarse-to-fine encoder cost and what it is worth downstream, next to the baseline's."""
    from common.training.ledger import Ledger

    rows = ["| pretraining | training FLOPs | training time (s) | linear probe acc (%) | fine-tuned acc (%, best "
            "epoch / test) |", "|---|---:|---:|---:|---:|"]
    base_total = Ledger.read(out / "pretrain" / "baseline").to_dict()["total"]
    for name, label, ft in (("baseline", "baseline, full resolution", "from_baseline"),
                            ("c2f", "coarse to fine, Fshift 4→1", "from_c2f")):
        total = Ledger.read(out / "pretrain" / name).to_dict()["total"]
        saving = "" if name == "baseline" else f" ({total['train_flops'] / base_total['train_flops'] - 1:+.1%})"
        tuned = Ledger.read(out / "finetune" / ft)
        best = max(e["metrics"]["acc"] for e in tuned.evals if "acc" in e["metrics"])
        test = json.loads((out / "finetune" / ft / "test_metrics.json").read_text())["acc"]
        rows.append(f"| {label} | {total['train_flops']:.3g}{saving} | "
                    f"{total['wall_seconds']:.0f} | {100 * probes[name]:.1f} | {100 * best:.1f} / {100 * test:.1f} |")
    rows += ["", "| HTS-AT (tiny Swin), fine-tuning from scratch | training FLOPs | training time (s) | fine-tuned acc "
             "(%, best epoch / test) |", "|---|---:|---:|---:|"]
    base = Ledger.read(out / "finetune" / "htsat_baseline").to_dict()["total"]["train_flops"]
    for name in ("htsat_baseline", "htsat_fshift4"):
        ledger = Ledger.read(out / "finetune" / name)
        epochs = " + ".join(str(p.epochs) for p in ledger.phases)
        label = (f"full resolution, {epochs} epochs" if len(ledger.phases) == 1
                 else f"coarse to fine, Fshift 4→1 ({epochs} epochs)")
        total = ledger.to_dict()["total"]
        saving = "" if name == "htsat_baseline" else f" ({total['train_flops'] / base - 1:+.1%})"
        best = max(e["metrics"]["acc"] for e in ledger.evals if "acc" in e["metrics"] and e["phase"] == len(
            ledger.phases) - 1)
        test = json.loads((out / "finetune" / name / "test_metrics.json").read_text())["acc"]
        rows.append(f"| {label} | {total['train_flops']:.3g}{saving} | {total['wall_seconds']:.0f} | "
                    f"{100 * best:.1f} / {100 * test:.1f} |")
    rows.append(f"\n(12 classes: chance is {100 / 12:.1f} %)")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune/demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in well under a minute")
    args = parser.parse_args(argv)
    try:
        run(args.out, args.quick)
    except RuntimeError as err:
        print(f"demo failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
