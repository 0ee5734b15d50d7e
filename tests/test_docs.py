"""The documentation checks itself: README.md stays short, every relative link in README.md and docs/*.md
points at something that exists, and docs/cli.md is exactly the `--help` of every command.

docs/cli.md is written by this file: `python tests/test_docs.py --write` regenerates it from
`resnet50_recipe.cli.build_parser()`, formatted at a fixed width so that the text is the same on every terminal.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CLI_MD = ROOT / "docs" / "cli.md"
COLUMNS = 100  # the help is formatted as `COLUMNS=100 resnet50-recipe ... --help` prints it
REWRITE = "python tests/test_docs.py --write"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("resnet50-recipe",)):
    """(command words, parser) for the parser and every subcommand under it, depth first, in declaration order."""
    yield path, parser
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias maps to the same parser
                    seen.add(id(sub))
                    yield from subcommands(sub, path + (name,))


def help_text(parser: argparse.ArgumentParser) -> str:
    """The parser's --help at COLUMNS columns: argparse takes the terminal's width less 2 when given none."""
    formatter = parser.formatter_class
    parser.formatter_class = functools.partial(formatter, width=COLUMNS - 2)
    color = getattr(parser, "color", None)
    if color is not None:
        parser.color = False  # Python 3.14 colours help on a terminal
    try:
        return parser.format_help()
    finally:
        parser.formatter_class = formatter
        if color is not None:
            parser.color = color


def cli_reference() -> str:
    """docs/cli.md as it should be."""
    from resnet50_recipe.cli import build_parser

    commands = list(subcommands(build_parser()))
    slug = "-".join  # GitHub's anchor for a heading of plain words
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Written by tests/test_docs.py from resnet50_recipe.cli.build_parser() with Python {PYTHON}; do not",
        f"edit by hand. After changing a command, rewrite it with `{REWRITE}`. -->",
        "",
        "The `--help` text of `resnet50-recipe` and of every subcommand, as",
        f"`COLUMNS={COLUMNS} resnet50-recipe ... --help` prints it; this is the one place the flags are listed.",
        "What the commands are for: [recipes.md](recipes.md) (`train`, `eval`), [data.md](data.md) (`data`,",
        "`bench data`), [speed.md](speed.md) (`bench step`), [preemption.md](preemption.md) (`runs`),",
        "[aws.md](aws.md) (`aws`), [inspect.md](inspect.md) (`watch`, `report`, `predict`, `explain`),",
        "[hub.md](hub.md) (`export`, `push`). Exit statuses: [exit-codes.md](exit-codes.md).",
        "",
    ]
    lines += [f"- [{' '.join(path)}](#{slug(path)})" for path, _ in commands]
    for path, parser in commands:
        lines += ["", f"## {' '.join(path)}", "", "```text", help_text(parser).rstrip("\n"), "```"]
    return "\n".join(lines) + "\n"


def normalised(text: str) -> str:
    """What stays the same across Python versions: argparse rewraps usage lines and renamed "optional
    arguments:" to "options:" (3.10), so compare words only when the reference came from another version."""
    text = re.sub(r"with Python \d+\.\d+;", "with Python X;", text).replace("optional arguments:", "options:")
    return " ".join(text.split())


def test_cli_reference_is_the_parsers_help():
    expected = cli_reference()
    actual = CLI_MD.read_text() if CLI_MD.exists() else ""
    if actual == expected:
        return
    written_with = re.search(r"with Python (\d+\.\d+);", actual)
    if written_with and written_with.group(1) != PYTHON and normalised(actual) == normalised(expected):
        return  # the same text, wrapped by another Python's argparse
    diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), "docs/cli.md",
                                             "build_parser()'s help"))[:60])
    raise AssertionError(f"docs/cli.md is not the CLI's --help as the parser prints it; rewrite it with "
                         f"`{REWRITE}`.\n{diff}")


def test_readme_is_short_and_starts_with_make_demo():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail to a page under docs/ (at most 200)"
    assert any("make demo" in line for line in lines[:40]), "README.md must show `make demo` in its first 40 lines"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (duplicates get -1, -2...)."""
    found, counts = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def relative_links(page: Path):
    """Targets of the page's Markdown links that are not URLs, outside fenced code blocks."""
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
            yield target


def test_every_relative_link_in_readme_and_docs_exists():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading in {file.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: {REWRITE}   (rewrites docs/cli.md from the parser)")
    sys.path.insert(0, str(ROOT))
    CLI_MD.write_text(cli_reference())
    print(f"wrote {CLI_MD.relative_to(ROOT)}")
