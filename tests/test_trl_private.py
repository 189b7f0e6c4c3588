"""Which TRL names outside TRL's public API the package uses, and how (`gnivo_trl/_trl_private.py`).

A name is public when an `__all__` of the TRL module it is imported from lists it (`trl`, `trl.trainer`,
`trl.models`, `trl.kernels` export theirs; `trl.trainer.utils`, `trl.extras.profiling`, `trl.chat_template_utils` and
`trl.kernels.chunked_divergence` have none). Every other name goes through `trl_private(module, name)`, looked up
when used. `NON_PUBLIC_TRL_NAMES` is the list a TRL upgrade checks: a change to what the package uses fails
`test_the_non_public_trl_names_the_package_uses_are_exactly_the_listed_ones` until the list is updated.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from gnivo_trl._trl_private import SUPPORTED_TRL, profiled, trl_private

PACKAGE = Path(__file__).parents[1] / "gnivo_trl"

# (module, name) of every non-public TRL name the package uses, each through trl_private where used.
NON_PUBLIC_TRL_NAMES = {
    ("trl.chat_template_utils", "parse_response"),  # agent_task: reads a tool call back from token ids, as TRL does
    ("trl.chat_template_utils", "qwen3_chat_template"),  # agent_task, testing: TRL's Qwen3 template for tool calls
    ("trl.extras.profiling", "profiling_decorator"),  # _trl_private.profiled: TRL's timing of trainer methods
    ("trl.kernels.chunked_divergence", "ChunkedDivergenceFunction"),  # scoring: VIMPO's exact KL
    ("trl.kernels.chunked_divergence", "VOCAB_CHUNK_SIZE"),  # scoring: the candidate-set KL's vocabulary tiles
    ("trl.kernels.chunked_divergence", "_compute_dtype"),  # scoring: the candidate-set KL projects as the kernel does
    ("trl.kernels.chunked_divergence", "_project"),
    ("trl.trainer.utils", "maybe_gather_lm_head_ctx"),  # scoring: ZeRO-3 head gathering
    ("trl.trainer.utils", "split_pixel_values_by_grid"),  # group_bookkeeping: GRPO's buffering, groups kept whole
    ("trl.trainer.utils", "split_tensor_dict"),
    ("trl.trainer.utils", "unsplit_pixel_values_by_grid"),
    ("trl.trainer.utils", "use_adapter"),  # vimpo_trainer: the PEFT reference (adapter disabled or "ref")
}


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Names bound to one string constant in a module (`module = "trl..."`), to resolve `trl_private(module, ...)`."""
    values: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, set()).add(node.value.value)
    return {name: next(iter(found)) for name, found in values.items() if len(found) == 1}


def non_public_trl_names_used() -> set[tuple[str, str]]:
    """Every `trl_private(module, name)` call and every name imported `from trl... import` that is not in that
    module's `__all__`, over the package's source."""
    used = set()
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        constants = _string_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "trl":
                exported = getattr(importlib.import_module(node.module), "__all__", ())
                used |= {(node.module, alias.name) for alias in node.names if alias.name not in exported}
            elif isinstance(node, ast.Import):
                # `import trl` is public (trl.__version__); `import trl.x` reaches into a module.
                used |= {(alias.name, "*") for alias in node.names if alias.name.startswith("trl.")}
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == (
                "trl_private"
            ):
                arguments = []
                for argument in node.args:
                    if isinstance(argument, ast.Constant):
                        arguments.append(argument.value)
                    else:
                        assert isinstance(argument, ast.Name) and argument.id in constants, (
                            f"{path.name}:{node.lineno}: pass trl_private string literals (or a name bound to one "
                            "string in the module), so that this test can read what is used"
                        )
                        arguments.append(constants[argument.id])
                used.add(tuple(arguments))
    return used


def test_the_non_public_trl_names_the_package_uses_are_exactly_the_listed_ones():
    used = non_public_trl_names_used()
    assert used - NON_PUBLIC_TRL_NAMES == set(), "newly used: list them here (and in the CHANGELOG)"
    assert NON_PUBLIC_TRL_NAMES - used == set(), "no longer used: remove them from the list"


def test_the_only_non_public_trl_imports_go_through_trl_private():
    """No `from trl... import` of a non-public name is left: each one is looked up where it is used."""
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "trl":
                exported = getattr(importlib.import_module(node.module), "__all__", ())
                names = [alias.name for alias in node.names]
                assert set(names) <= set(exported), f"{path.name}:{node.lineno}: from {node.module} import {names}"


def test_the_installed_trl_has_every_listed_name():
    for module, name in sorted(NON_PUBLIC_TRL_NAMES):
        assert trl_private(module, name) is not None


def test_the_package_imports_without_any_non_public_trl_name():
    """With every listed name removed from its TRL module (after TRL itself has imported them), every public module of
    the package still imports: a TRL release that renames one breaks only the feature that uses it."""
    modules = sorted(f"gnivo_trl.{p.stem}" for p in PACKAGE.glob("*.py") if not p.stem.startswith("_"))
    code = "\n".join(
        [
            "import importlib, trl",
            "trl.GRPOTrainer, trl.SFTTrainer",  # TRL's own modules import what they need first
            *(f"delattr(importlib.import_module({m!r}), {n!r})" for m, n in sorted(NON_PUBLIC_TRL_NAMES)),
            *(f"import {module}" for module in modules),
            "print('imported')",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]


def test_a_missing_name_is_an_import_error_naming_the_supported_trl():
    with pytest.raises(ImportError) as error:
        trl_private("trl.trainer.utils", "_renamed_in_a_later_release")
    assert SUPPORTED_TRL in str(error.value) and "pip install" in str(error.value)


def test_profiled_times_a_method_with_trls_profiling_decorator_on_first_call(monkeypatch):
    """`profiled` applies TRL's own decorator, looked up on the first call (not at class definition), and then times
    every call under `<class>.<method>` as TRL's decorated methods are."""
    import trl.extras.profiling as profiling

    timed = []

    class Recorder:
        def __init__(self, trainer, name):
            timed.append(f"{type(trainer).__name__}.{name}")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Trainer:
        state, args = object(), object()

        @profiled
        def _compute_loss(self, x):
            return 2 * x

    monkeypatch.setattr(profiling, "profiling_context", Recorder)  # what TRL's decorator calls
    trainer = Trainer()
    assert trainer._compute_loss(3) == 6 and trainer._compute_loss(4) == 8
    assert timed == ["Trainer._compute_loss", "Trainer._compute_loss"]
    assert Trainer._compute_loss.__name__ == "_compute_loss"
