"""The package surface: cheap import, lazy API, public functions that stay functions (no module doubles as one)."""

import subprocess
import sys

import pytest


def test_import_is_cheap():
    code = "import sys, sfmkern; print(sorted(m for m in ('timm', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name,module", [("distill", "sfmkern.distillation"), ("evaluate", "sfmkern.evaluation"),
                                         ("collect_stats", "sfmkern.stats"), ("plan", "sfmkern.distillation")])
def test_public_functions_stay_functions_whatever_is_imported(name, module):
    """No module doubles as a function: the phase modules are named apart from the public functions, so importing
    every one of them leaves `sfmkern.distill(...)`, `sfmkern.evaluate(...)` plain functions."""
    import importlib
    import inspect
    import types

    import sfmkern

    for mod in ("sfmkern.distillation", "sfmkern.evaluation", "sfmkern.stats", "sfmkern.pipeline", "sfmkern.cli",
                "sfmkern.demo", module):
        importlib.import_module(mod)
    fn = getattr(sfmkern, name)
    assert inspect.isfunction(fn) and not isinstance(fn, types.ModuleType)
    assert fn.__name__ == name and fn.__module__.startswith(("sfmkern.pipeline", module))
    assert not any(type(m) is not types.ModuleType for k, m in sys.modules.items() if k.startswith("sfmkern"))
    with pytest.raises(TypeError):
        fn()  # the function's own signature check fires


def test_unknown_attribute():
    import sfmkern

    with pytest.raises(AttributeError, match="no_such_thing"):
        sfmkern.no_such_thing  # noqa: B018


def test_submodules_reachable_from_the_package():
    import sfmkern

    assert sfmkern.data.ImageFolder is not None and callable(sfmkern.ops.sfm_loss)
