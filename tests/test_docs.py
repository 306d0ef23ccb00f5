"""Everything the repository cites is in the repository: no reference to a document outside it, and every pointer
into docs/ (`docs/<page>.md#<anchor>` in code, tests and Markdown) and every relative link of the Markdown files
outside docs/ resolves. Links between the pages in docs/ are checked by `mkdocs build --strict` (.ci/run). The facts
the docs state that the code also knows are compared with it: the results schema's columns, the README's methods."""
from __future__ import annotations

import re
import subprocess
import unicodedata
from functools import cache
from pathlib import Path

import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Notes that were never part of the repository: a specification, its section numbers, issue and stack notes.
EXTERNAL = re.compile(r"\bSPEC\b|(?i:issue notes|stack notes|NOTES-stack)")

POINTER = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


@cache
def tracked_text_files() -> dict[str, str]:
    """path -> text of every tracked file that reads as UTF-8 text."""
    paths = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    files = {}
    for path in filter(None, paths.split("\0")):
        try:
            files[path] = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
    return files


def external_references(text: str) -> list[str]:
    return [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}" for m in EXTERNAL.finditer(text)]


def test_no_tracked_file_cites_a_document_outside_the_repository():
    found = {path: refs for path, text in tracked_text_files().items()
             if path != THIS and (refs := external_references(text))}
    assert not found, ("cite the docs/ page that holds it instead (docs/contributing.md#where-a-fact-lives): "
                       f"{found}")


def markdown_slugs(heading: str) -> set[str]:
    """The anchors a heading gets: an explicit `{#id}`, else the slug of mkdocs' toc extension and GitHub's."""
    explicit = re.search(r"\{#([\w-]+)\}\s*$", heading)
    if explicit:
        return {explicit.group(1)}
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    mkdocs = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip().lower())
    github = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
    return {mkdocs, github}


@cache
def anchors(path: Path) -> frozenset[str]:
    found: set[str] = set()
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := HEADING.match(line)):
            found |= markdown_slugs(m.group(1))
    return frozenset(found)


def broken(target: Path, anchor: str | None) -> str | None:
    if not target.is_file():
        return "no such file"
    if anchor and target.suffix == ".md" and anchor not in anchors(target):
        return f"no heading with anchor #{anchor}"
    return None


def test_markdown_anchors_follow_mkdocs_and_github():
    assert markdown_slugs("SCA: the channel projection") == {"sca-the-channel-projection"}
    assert markdown_slugs("`step_time.py`") == {"step_timepy"}
    assert markdown_slugs("Frequency bands {#bands}") == {"bands"}


def test_every_pointer_into_docs_resolves():
    problems = []
    for path, text in tracked_text_files().items():
        for m in POINTER.finditer(text):
            reason = broken(ROOT / "docs" / m.group(1), m.group(2))
            if reason:
                problems.append(f"{path}: {m.group(0)} ({reason})")
    assert not problems, "\n".join(problems)


def test_every_relative_link_of_the_markdown_outside_docs_resolves():
    problems = []
    for path, text in tracked_text_files().items():
        if not path.endswith(".md") or path.startswith("docs/"):
            continue
        for m in LINK.finditer(text):
            url = m.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", url):  # http:, https:, mailto:
                continue
            file, _, anchor = url.partition("#")
            target = (ROOT / path).parent / file if file else ROOT / path
            reason = broken(target.resolve(), anchor or None)
            if reason:
                problems.append(f"{path}: ({url}) ({reason})")
    assert not problems, "\n".join(problems)


TYPE_NAMES = {"int32": pa.int32(), "int64": pa.int64(), "double": pa.float64(), "string": pa.string(),
              "bool": pa.bool_(), "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
              "map<string, string>": pa.map_(pa.string(), pa.string()),
              "map<string, double>": pa.map_(pa.string(), pa.float64())}


def documented_columns(section: str) -> dict[str, pa.DataType]:
    """{column: type} from the table under `## <section>` of docs/results-schema.md (a row may name several columns
    and, comma-separated, one type each or one for all)."""
    text = (ROOT / "docs" / "results-schema.md").read_text()
    body = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    columns = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        types = [cells[1]] * len(names) if cells[1] in TYPE_NAMES else cells[1].split(", ")
        columns.update(zip(names, (TYPE_NAMES[t] for t in types)))
    return columns


@pytest.mark.parametrize("section", ["trials.parquet", "epochs.parquet"])
def test_the_results_schema_page_is_the_schema_the_code_writes(section):
    from uhkd.config import LEAF_TYPES
    from uhkd.sweep.results import SCHEMA_VERSION, epochs_schema, trials_schema

    schema = trials_schema() if section == "trials.parquet" else epochs_schema()
    written = dict(zip(schema.names, schema.types))
    documented = documented_columns(section)
    assert {name: written.get(name) for name in documented} == documented
    config = set(LEAF_TYPES) if section == "trials.parquet" else set()
    assert set(written) - (config - set(documented)) == set(documented)  # every other column is in the table
    assert f"schema **version {SCHEMA_VERSION}**" in (ROOT / "docs" / "results-schema.md").read_text()


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_methods_table_is_the_method_registry():
    """One row per built-in method (name, display name) in the registry's table order; a plugin's method (the test
    session loads examples/my_method.py) is the user's own and has no row."""
    from uhkd.methods import registered

    built_in = [(cls.name, cls.display) for cls in registered() if cls.__module__.startswith("uhkd.methods.")]
    rows = []
    for line in readme_section("Methods").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            rows.append((cells[0].strip("`"), cells[1]))
    assert rows == built_in


def test_readme_lines_fit_in_120_characters():
    long = [f"line {i}: {len(line)}" for i, line in
            enumerate((ROOT / "README.md").read_text(encoding="utf-8").splitlines(), 1) if len(line) > 120]
    assert not long, long
