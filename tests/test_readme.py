"""README stays true: every `fer-tune ...` command it shows parses with the real CLI, names files that exist, and
its subcommand is run by some test; the two set-up commands are the ones CI and the tests run."""

import re
import shlex
from pathlib import Path

import pytest

from fer_tune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    prose = "\n".join(line for line in README.splitlines() if not line.startswith("|"))  # not the usage table
    code = re.findall(r"```bash\n(.*?)```", README, re.S) + re.findall(r"`([^`\n]+)`", prose)
    cmds = set()
    for chunk in code:
        for m in re.finditer(r"(?<![\w/~.-])fer-tune ([^'`\n#]*)", chunk.replace("\\\n", " ")):
            cmd = m.group(1).strip().rstrip(".,;:")
            # skip usage patterns ([--opt], A|B, ...) and prose like "fer-tune sweep ... --address auto"
            if not cmd or "[" in cmd or "|" in cmd or "..." in cmd or cmd.startswith("<") or cmd == "study":
                continue
            if " " not in cmd and cmd not in ("demo", "models"):  # prose naming a command: "`fer-tune sweep` ..."
                continue
            cmds.add(cmd)
    return sorted(cmds)


COMMANDS = readme_commands()


def test_readme_shows_the_two_setup_commands():
    assert "pip install -e . && fer-tune demo" in README
    assert "pip install -e '.[test]' && python -m pytest -q -n 2 --dist loadfile" in README
    assert "pip install -e '.[test]' && python -m pytest -q -n 2 --dist loadfile" in (ROOT / ".ci" / "run").read_text()
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_parses_and_is_tested(cmd):
    argv = shlex.split(cmd)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README command `fer-tune {cmd}` does not parse (exit {exc.code})")
    assert getattr(args, "func", None), cmd
    for a in argv:
        if a.startswith("search_spaces/"):
            assert (ROOT / a).is_file(), f"README names {a}, which does not exist"
    sub = argv[0]
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_readme.py")
    assert f'"{sub}"' in tests, f"no test runs `fer-tune {sub}`"


def test_every_option_of_every_command_has_help_text():
    import argparse

    from fer_tune.cli import build_parser

    missing = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, [*path, name])
            elif not a.help and a.dest != "help":
                missing.append(f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), ["fer-tune"])
    assert not missing, missing
