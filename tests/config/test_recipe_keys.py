"""docs/recipe_keys.md is the reference the recipe dataclasses give (common.config.reference): current, and
every key a recipe can set is in it, described."""

from pathlib import Path

from common.config.reference import keys, markdown
from finetune.linear_probe import ProbeRecipe
from finetune.recipe import FinetuneRecipe
from finetune.recipe_keys import directives, other_recipes, recipe_classes
from pretrain.recipe import PretrainRecipe

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipe_keys.md"


def test_the_recipe_key_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == markdown(recipe_classes(), other_recipes(), directives()), \
        "docs/recipe_keys.md is out of date: python -m finetune.recipe_keys > docs/recipe_keys.md"


def test_the_reference_has_the_keys_read_before_a_recipe_is_built():
    """``defaults`` (a task file's, ``--set defaults=``) and ``extends`` are keys a user writes though no recipe
    dataclass holds them: the page names them, with what ``defaults`` may be."""
    from finetune.task_recipes import RECIPES

    page = DOC.read_text(encoding="utf-8")
    top = page.split("## (top level)")[1].split("\n## ")[0]
    defaults = next(line for line in top.splitlines() if line.startswith("| `defaults` |"))
    assert "`auto`" in defaults and "`package`" in defaults and all(f"`{n}`" in defaults for n in RECIPES)
    assert defaults.endswith("(fine-tuning only) |")
    assert any(line.startswith("| `extends` | str |") for line in top.splitlines())


def test_every_key_is_described_and_settable():
    from common.config.recipe import apply_overrides

    rows = [*keys(PretrainRecipe), *keys(FinetuneRecipe)]
    assert len(rows) > 150
    assert [key for key, kind, _, text in keys(ProbeRecipe) if not text] == []
    leaves = [key for key, kind, _, text in rows if "section" not in kind]
    assert [key for key, kind, _, text in rows if "section" not in kind and not text] == []
    # each key is one --set can reach (a list of sections is indexed: phases.0.epochs)
    data = {"phases": [{}], "data": {"train": [{}]}, "task": {}}
    for key in leaves:
        apply_overrides(data, [f"{key.replace('.N.', '.0.')}=1"])
