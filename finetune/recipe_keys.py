"""``python -m finetune.recipe_keys > docs/recipe_keys.md``: every key of the pretraining, fine-tuning and
linear-probe recipes, their types, defaults and meanings (``common.config.reference``)."""

from __future__ import annotations

import argparse
import sys

# Imports the command alone needs are inside its functions: --help answers without loading torch.



def recipe_classes() -> list[tuple[str, type]]:
    """``(which runs read it, recipe dataclass)`` of both trainers."""
    from finetune.recipe import FinetuneRecipe
    from pretrain.recipe import PretrainRecipe

    return [("pretraining", PretrainRecipe), ("fine-tuning", FinetuneRecipe)]


def other_recipes() -> list[tuple[str, str, type]]:
    """``(heading, what reads it, recipe dataclass)`` of the recipes with keys of their own."""
    from finetune.linear_probe import ProbeRecipe

    return [("Linear-probe recipes", "Read by ``python finetune/linear_probe.py --recipe FILE`` "
             "(``recipes/linear_probe.yaml``); its options replace the recipe's values.", ProbeRecipe)]


def directives() -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """The top-level keys that are read before a recipe is built, so that no recipe dataclass holds them
    (``common.config.reference.markdown``'s ``directives``)."""
    from finetune.task_recipes import AUTO, PACKAGE, RECIPES

    named = ", ".join(f"``{name}``" for name in RECIPES)
    return [
        ("defaults", "str | null", "null",
         f"what a fine-tuning recipe starts from (a task file's ``defaults:``, a ``--recipe`` file's or ``--set "
         f"defaults=...``): ``{AUTO}``, the published recipe closest to the task and the init; ``{PACKAGE}``, the "
         f"package's bare defaults; or one by name ({named}; ``finetune/task_recipes.py``). null: a task file "
         f"takes ``{AUTO}``, a registered task its own recipe.", ("fine-tuning",)),
        ("extends", "str", "(none)",
         "a recipe file only, not ``--set``: the path of another recipe (relative to this file) that this one "
         "starts from; mappings merge key by key, lists and values are replaced (the linear probe's recipe too).",
         ("pretraining", "fine-tuning")),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.recipe_keys",
                                     description="Print the recipe key reference (docs/recipe_keys.md) as Markdown.")
    parser.parse_args(argv)
    from common.config.reference import markdown

    sys.stdout.write(markdown(recipe_classes(), other_recipes(), directives()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
