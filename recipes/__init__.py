"""Recipes shipped with the package, resolved by name: `resnet50-recipe train imagenet-81`."""
