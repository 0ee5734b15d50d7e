"""Train timm ImageNet classifiers from validated YAML recipes.

    from resnet50_recipe import load_recipe, train
    summary = train(load_recipe("smoke"), output="runs/smoke")
"""
__version__ = "0.1.0"

from .recipe import Recipe, RecipeError, load_recipe, to_yaml  # noqa: E402
from .engine import evaluate_checkpoint, train  # noqa: E402
from .hub import export, push  # noqa: E402

__all__ = ["Recipe", "RecipeError", "load_recipe", "to_yaml", "train", "evaluate_checkpoint", "export", "push",
           "__version__"]
