"""Train timm ImageNet classifiers from validated YAML recipes.

    from resnet50_recipe import load_recipe, train
    summary = train(load_recipe("smoke"), output="runs/smoke")
"""

from resnet50_recipe.errors import UserError
from resnet50_recipe.inspect.evaluate import evaluate_checkpoint
from resnet50_recipe.publish.export import export
from resnet50_recipe.publish.push import push
from resnet50_recipe.recipe import Recipe, RecipeError, load_recipe, to_yaml
from resnet50_recipe.trainer.run import train
from resnet50_recipe.version import __version__

__all__ = ["Recipe", "RecipeError", "UserError", "load_recipe", "to_yaml", "train", "evaluate_checkpoint", "export",
           "push", "__version__"]
