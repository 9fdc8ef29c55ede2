"""`acx-rt` dispatch: unknown commands and missing optional extras end in one line, not a traceback."""

import sys

import pytest

from acx_ramanujan import cli


@pytest.mark.parametrize("command, module, package, extra", [
    ("finetune", "acx_ramanujan.training.causal_lm", "peft", "train"),
    ("verify", "acx_ramanujan.study.verify", "matplotlib", "train"),
])
def test_missing_extra_names_the_package_and_the_install(monkeypatch, capsys, command, module, package, extra):
    # Transformers' own lazy imports probe peft with find_spec, which a None entry in sys.modules would break:
    # import them first, as a real environment without peft would.
    from transformers import EvalPrediction, Trainer  # noqa: F401

    for name in [name for name in sys.modules if name == module or name.startswith(("acx_ramanujan.training.lora", module + "."))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ModuleNotFoundError
    assert cli.main([command, "--help"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"needs the {package!r} package from the [{extra}] extra" in line
    assert f"acx-ramanujan-transformer[{extra}]" in line


def test_unknown_command_lists_the_commands(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err and "bench-speed" in err
