"""The package version, in a module of its own so that any module can import it without importing the package's
public API (resnet50_recipe/__init__.py imports the trainer)."""


__all__ = ["__version__"]

__version__ = "0.1.0"
