"""The README cannot drift from the program.

Fast checks: every ``steerstore …`` command the README shows (code blocks and inline code, with each
``a|b|c`` alternative) parses and builds its config; every ``--section.option`` it names is an option of
a subcommand; every ``make`` target exists; every relative link (README and docs/) reaches a file and a
heading; the serving methods it lists are the method vocabulary.

Slow check: the quick sections run as a newcomer runs them, in a fresh folder — the demo (on the tiny
model instead of SmolLM2, so in ~1 minute), every command after it verbatim, the inputs' refresh
command, and the serving snippet against the demo's store.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STEERSTORE = str(Path(sys.executable).parent / "steerstore")


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def _section(text: str, heading: str) -> str:
    """The README's text from ``heading`` to the next heading of the same level."""
    start = text.index(heading)
    level = heading.split(" ")[0]
    nxt = re.search(rf"^{level} ", text[start + len(heading):], flags=re.MULTILINE)
    return text[start:start + len(heading) + (nxt.start() if nxt else len(text))]


def block_commands(text: str) -> list[str]:
    """The ``steerstore`` command lines of the bash blocks (comments dropped)."""
    out = []
    for block in _blocks(text, "bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if re.match(r"^(\.venv/bin/)?steerstore ", line):
                out.append(line)
    return out


def inline_commands(text: str) -> list[str]:
    """Inline ``steerstore …`` spans, less the quoted error messages (they say what to install)."""
    return [c for c in re.findall(r"`([^`\n]+)`", text) if c.startswith("steerstore ") and "pip install" not in c]


def _variants(command: str) -> list[list[str]]:
    """argv lists for one shown command: optional ``[…]`` parts included, ``…`` dropped, each
    alternative of an ``a|b|c`` value tried (the others at their first)."""
    words = [w for w in shlex.split(command.replace("[", " ").replace("]", " ")) if w != "…"][1:]
    if not any(not w.startswith("-") for w in words) or words[:2] == ["bench", "<name>"]:
        return []  # a template (`steerstore --debug …`, `steerstore bench <name>`), not a command
    choices = [i for i, w in enumerate(words) if "|" in w and not w.startswith("-")]
    base = [w.split("|")[0] if i in choices else w for i, w in enumerate(words)]
    out = [base]
    for i in choices:
        for alt in words[i].split("|")[1:]:
            out.append(base[:i] + [alt] + base[i + 1:])
    return out


def _parse(argv: list[str], complete: bool = True) -> None:
    """``complete=False``: a mention in the text (`steerstore refresh`) may leave out required options;
    a refusal must then be about one of those, not about an option it shows."""
    from steerstore.infra.config import ConfigError, load
    from steerstore.jobs import cli

    parser = cli.build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"README command does not parse: steerstore {shlex.join(argv)}", pytrace=False)
    name, cls, _ = cli._resolve(args)
    overrides = {"store": args.store_uri} if getattr(args, "store_uri", None) else {}
    try:
        load(cls, args.config, args, overrides)
    except ConfigError as exc:
        given = {a.lstrip("-") for a in argv if a.startswith("--")}
        if not complete and not any(re.search(rf"\b{re.escape(g)}\b", str(exc)) for g in given):
            return  # about an option the mention leaves out
        pytest.fail(f"README command's config is refused: steerstore {shlex.join(argv)}: {exc}", pytrace=False)


def test_every_readme_command_parses(monkeypatch):
    monkeypatch.chdir(ROOT)  # --config infra/deploy/… is relative to the clone
    text = README.read_text()
    blocks, inline = block_commands(text), inline_commands(text)
    assert len(blocks) >= 6 and len(inline) >= 15, (blocks, inline)  # the extraction must keep finding them
    for command in blocks + inline:
        for argv in _variants(command):
            _parse(argv, complete=command in blocks)


def test_a_wrong_command_is_caught():
    """The check above fails on the drift it exists for (the README once said ``--method steerx``)."""
    with pytest.raises(pytest.fail.Exception, match="generate"):
        _parse(["generate", "--store", "s", "--user", "u", "--prompt", "p", "--method", "steerx"])
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        _parse(["refresh", "--ray.adress", "auto"])


def _all_options() -> set[str]:
    from steerstore.jobs import cli

    parser = cli.build_parser(full=True)
    found: set[str] = set()

    def walk(p):
        for action in p._actions:
            found.update(s for s in action.option_strings if s.startswith("--"))
            for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
                walk(sub)
    walk(parser)
    return found


def test_every_option_the_readme_names_exists():
    named = set(re.findall(r"(?<![\w-])(--[a-z_]+(?:\.[a-z_]+)+)", README.read_text())) - {"--section.field"}
    assert len(named) >= 10, named
    missing = sorted(named - _all_options())
    assert not missing, f"the README names options no subcommand has: {missing}"


def test_make_targets_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README.read_text()))
    named |= {m for b in _blocks(README.read_text(), "bash") for m in re.findall(r"^make ([a-z][\w-]*)", b, re.MULTILINE)}
    assert {"demo", "test"} <= named
    assert named <= targets, f"the README names make targets the Makefile lacks: {sorted(named - targets)}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_relative_links_reach_a_file_and_heading():
    assert _slug("Runtime passes on an H100 at Llama-3.1-8B shape") == "runtime-passes-on-an-h100-at-llama-31-8b-shape"
    broken = []
    for page in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_listed_methods_are_the_vocabulary():
    from steerstore.operators.serving import METHODS

    line = re.search(r"^- Methods: (.*)\.", README.read_text(), flags=re.MULTILINE).group(1)
    assert tuple(re.findall(r"`(\w+)`", line)) == METHODS


# --- the quick sections, run ---------------------------------------------------------------------

def _run(command: str, cwd: Path, env: dict) -> str:
    argv = shlex.split(command)
    if argv[0] in (".venv/bin/steerstore", "steerstore"):
        argv[0] = STEERSTORE
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README command failed ({done.returncode}): {command}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
def test_readme_quick_sections_run(tmp_path):
    from tests.tiny import save_tiny

    text = README.read_text()
    env = {**os.environ, "RAY_ADDRESS": "local"}  # each command's own embedded Ray, as on a fresh machine
    save_tiny(tmp_path / "tiny")
    tiny = ["--model.name_or_path", "./tiny", "--ray.progress_bars", "false"]

    # `make demo` is `steerstore demo` after the set-up; here on the tiny model
    two = _blocks(_section(text, "## Two commands"), "bash")[0]
    assert re.search(r"^make demo\b", two, flags=re.MULTILINE)
    out = _run(shlex.join([STEERSTORE, "demo", *tiny]), tmp_path, env)
    assert "enthusiastic-0" in out and "formal-0" in out

    after = block_commands(_section(text, "## Two commands").split("After the demo", 1)[1])
    assert len(after) >= 4 and any(" inspect " in c for c in after) and any(" export " in c for c in after)
    for command in after:
        out = _run(command, tmp_path, env)
        if " generate " in command:
            from tests.tiny import answers

            plain, steered = answers(out)
            assert plain != steered or "note:" in out, out
    assert list((tmp_path / "steerstore-out" / "export").glob("formal-0*.gguf"))

    # the inputs section's refresh, on files named as it names them
    shutil.copy(tmp_path / "steerstore-out" / "inputs" / "pairs.jsonl", tmp_path / "pairs.jsonl")
    shutil.copy(tmp_path / "steerstore-out" / "inputs" / "histories.jsonl", tmp_path / "histories.jsonl")
    (refresh_cmd,) = block_commands(_section(text, "## Inputs at a glance"))
    _run(shlex.join(shlex.split(refresh_cmd) + tiny), tmp_path, env)
    assert re.search(r"^table users: 7 rows", _run(f"{STEERSTORE} inspect ./out/store", tmp_path, env), re.MULTILINE)

    # the serving snippet, pointed at the demo's store
    (snippet,) = _blocks(_section(text, "## Serving at a glance"), "python")
    assert '"s3://bucket/stores/prod"' in snippet
    code = snippet.replace('"s3://bucket/stores/prod"', repr(str(tmp_path / "steerstore-out" / "store")))
    script = tmp_path / "snippet.py"
    script.write_text(code)
    out = _run(f"{sys.executable} {script}", tmp_path, env)
    assert "new-user" in out and "u42" in out
