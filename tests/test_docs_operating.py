"""docs/operating.md, what platform teams and SREs read to run scopes: its policy table is the
policy's, and every command it shows is one `seal` takes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import typer

from seal.cli import app
from seal.scope_policy import parse_settings
from services.registry.actions import merged_policy
from shared.contracts import TrainingDirectives
from shared.registry_view import ScopePolicy

DOC = Path(__file__).resolve().parent.parent / "docs" / "operating.md"


def policy_rows() -> dict[str, str]:
    return dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", DOC.read_text(), flags=re.M))


def test_every_policy_setting_is_in_the_table_and_nothing_else() -> None:
    assert set(policy_rows()) == set(ScopePolicy.model_fields)


def test_the_defaults_it_states_are_the_policys() -> None:
    policy = ScopePolicy()
    for name, stated in policy_rows().items():
        value = getattr(policy, name)
        if isinstance(value, TrainingDirectives):
            numbers = {float(n) for n in re.findall(r"\d+(?:\.\d+)?", stated)}
            assert {float(value.learning_rate), float(value.epochs), float(value.lora_rank)} <= numbers, name
            continue
        shown = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else value
        if isinstance(value, tuple):
            shown = "empty" if not value else "[" + ", ".join(str(v) for v in value) + "]"
        first = re.match(r"`([^`]*)`|(\S+)", stated.strip())
        assert first is not None, (name, stated)
        said = first.group(1) or first.group(2)
        assert (float(said) == shown) if isinstance(shown, float) else said == str(shown), (name, stated, shown)


def commands() -> list[list[str]]:
    """Every `seal ...` line of the indented examples, without its comment."""
    lines = re.findall(r"^    (seal .*?)(?:\s+#.*)?$", DOC.read_text(), flags=re.M)
    assert len(lines) >= 10
    return [shlex.split(line)[1:] for line in lines]


def test_every_command_shown_is_one_seal_takes() -> None:
    """Each parses: the command exists, and its options and arguments are ones it takes (the
    command itself is not run). Typer carries its own click, so groups are known by their shape."""
    for argv in commands():
        command: Any = typer.main.get_command(app)
        rest, parent, name = list(argv), None, "seal"
        while hasattr(command, "get_command"):
            parent = command.context_class(command, info_name=name, parent=parent)
            name = rest.pop(0)
            command = command.get_command(parent, name)
            assert command is not None, f"seal {' '.join(argv)}: no command {name!r}"
        try:
            command.make_context(name, rest, parent=parent)
        except Exception as exc:  # the usage error of typer's click
            raise AssertionError(f"seal {' '.join(argv)}: {getattr(exc, 'format_message', exc.__str__)()}") from exc


def test_the_value_examples_parse_and_merge_as_it_says() -> None:
    text = DOC.read_text()
    examples = re.findall(r"`'(\w+=.*?)'`", text)
    assert len(examples) == 3
    policy = merged_policy(ScopePolicy(), parse_settings(examples))
    assert policy.strength_ladder == (1.0, 0.5) and policy.blocklist == ("internal codename",)
    # "changes the epochs and keeps the learning rate and the rank"
    assert policy.default_directives.epochs == 5
    assert policy.default_directives.learning_rate == ScopePolicy().default_directives.learning_rate
    assert policy.default_directives.lora_rank == ScopePolicy().default_directives.lora_rank
