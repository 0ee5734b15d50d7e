"""`python -m resnet50_recipe` run in this process, so that __main__.py is exercised and measured in the fast tier
too (test_recipe.py's console-script test runs it in a subprocess, which coverage does not see)."""
import runpy
import sys

import pytest


def test_python_dash_m_exits_with_the_status_main_returns(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["resnet50-recipe", "train", "no-such-recipe"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("resnet50_recipe", run_name="__main__")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("resnet50-recipe: error: ") and "no-such-recipe" in err and err.count("\n") == 1
