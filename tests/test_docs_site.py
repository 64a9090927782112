"""The documentation cannot drift from the code and the results: the CLI reference covers every
option of the real parser, the API reference covers every public name, the nav lists every
page, the performance tables and the headline figure match the committed JSON, and the README
keeps the commands CI checks, runs its code and links only to files that exist."""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _load(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- CLI reference
def _options(parser: argparse.ArgumentParser):
    """``(sub-command, action)`` for every documented action of every sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for a in sub._actions:
                    if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS:
                        yield name, a


def test_cli_reference_lists_every_option_with_its_default_and_meaning() -> None:
    from itop.app.cli import build_parser
    hook = _load(DOCS / "hooks" / "cli_reference.py", "cli_reference")
    parser = build_parser()
    md = hook.markdown(parser)
    sections = re.split(r"^## ", md, flags=re.M)
    by_cmd = {s.split("`")[1].split()[-1]: s for s in sections[1:]}
    options = list(_options(parser))
    assert {c for c, _ in options} == set(by_cmd) == {"train", "report", "bench"}
    for cmd, a in options:
        names = a.option_strings or [a.dest]
        rows = [ln for ln in by_cmd[cmd].splitlines() if ln.startswith("| `") and any(
            re.search(f"`{re.escape(n)}[` \\[]", ln.split("|")[1]) for n in names)]
        assert len(rows) == 1, f"itop {cmd} {names[0]}: {len(rows)} rows in the CLI reference"
        _opt, default, meaning = [c.strip() for c in rows[0].strip().strip("|").split(" | ")]
        assert meaning, f"itop {cmd} {names[0]} has no description (give it a help string)"
        if a.default not in (None, argparse.SUPPRESS) and not isinstance(a.default, bool):
            assert str(a.default) in default, (cmd, names[0], default)
        for choice in a.choices or ():
            assert f"`{choice}`" in meaning, (cmd, names[0], choice)


def test_cli_reference_renders_a_parser_it_has_never_seen() -> None:
    """A new option (another helper's, say) appears without touching the docs."""
    hook = _load(DOCS / "hooks" / "cli_reference.py", "cli_reference")
    p = argparse.ArgumentParser(prog="itop")
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", description="Train.")
    t.add_argument("--brand-new", type=int, default=7, help="a new option (%(default)s)")
    t.add_argument("--flag", action="store_true", help="a flag")
    md = hook.markdown(p)
    assert "| `--brand-new BRAND_NEW` | `7` | a new option (7) |" in md
    assert "| `--flag` | off | a flag |" in md


def test_mkdocs_generates_the_cli_page_from_the_parser() -> None:
    cfg = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "docs/hooks/cli_reference.py" in cfg and "cli.md" in cfg
    assert not (DOCS / "cli.md").exists(), "cli.md is generated; a file would shadow it"


# ----------------------------------------------------------------------------- API, nav
def _api_objects() -> set:
    text = "".join(p.read_text(encoding="utf-8") for p in (DOCS / "api").glob("*.md"))
    return set(re.findall(r"^::: ([\w.]+)", text, flags=re.M))


@pytest.mark.parametrize("package", ["itop", "itop_kernels"])
def test_api_reference_documents_every_public_name(package: str) -> None:
    mod = __import__(package)
    missing = [n for n in mod.__all__ if f"{package}.{n}" not in _api_objects()]
    assert not missing, f"public names without an API entry in docs/api/: {missing}"


def _nav_pages() -> list:
    cfg = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = cfg.split("\nnav:", 1)[1].split("\n\n", 1)[0]
    return re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M)


def test_nav_lists_every_page_and_only_pages_that_exist() -> None:
    pages = set(_nav_pages())
    files = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
             if not p.relative_to(DOCS).parts[0] in ("generated", "hooks")}
    assert files | {"cli.md"} == pages
    for page in ("reliability.md", "works-with.md", "block-size.md", "paper-mnist1d.md",
                 "design.md", "performance.md", "topology.md", "kernels.md", "layers.md",
                 "getting-started.md", "api/itop.md", "api/itop_kernels.md"):
        assert page in pages, page


def test_docs_name_no_missing_design_doc_and_no_nan() -> None:
    """DESIGN.md is not in the repository (docs/design.md is); "+nan" is not a result."""
    code = [p for d in ("itop", "itop_kernels", "benchmarks", "examples", "tests")
            for p in (ROOT / d).rglob("*.py") if p.name != "test_docs_site.py"]
    for path in [ROOT / "README.md", *DOCS.rglob("*.md"), *code]:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN.md" not in text, path
        if path.suffix == ".md":
            assert not re.search(r"[+-]nan\b", text), path


# ----------------------------------------------------------------------------- generated
def test_performance_tables_and_headline_figure_match_the_json() -> None:
    render = _load(ROOT / "benchmarks" / "render_docs.py", "render_docs")
    assert render.check() == []


def test_the_figure_check_notices_other_numbers(tmp_path, monkeypatch) -> None:
    """The PNG carries the hash of its numbers: change one number and the check fails."""
    render = _load(ROOT / "benchmarks" / "render_docs.py", "render_docs")
    series = render.headline_series()
    assert render.png_text(render.HEADLINE_PNG)[render.PNG_KEY] == render.series_hash(series)
    lines = series["cpu"]["lines"]
    first = next(iter(lines))
    lines[first][0][1] *= 1.01
    assert render.series_hash(series) != render.png_text(render.HEADLINE_PNG)[render.PNG_KEY]


def test_the_statements_in_words_are_checked_against_the_results(monkeypatch) -> None:
    """README.md and docs/ say, in words, that small layers are slower than dense; results
    that contradict it fail the check."""
    render = _load(ROOT / "benchmarks" / "render_docs.py", "render_docs")
    assert render.claims() == []
    real = render.load

    def faster_small_layer(name: str) -> dict:
        d = real(name)
        if name == render.SIZES[0]:
            for r in d["rows"]:
                if r["method"] == "ours_b32":
                    r["median_s"] /= 100
        return d

    monkeypatch.setattr(render, "load", faster_small_layer)
    assert any("256 × 256" in c for c in render.claims())


# ----------------------------------------------------------------------------- README
SETUP = 'pip install torch==2.13.0 && pip install -e ".[cli]" && itop train'
TEST = 'pip install -e ".[test]" && python -m pytest -q'


def test_readme_is_short_and_keeps_the_two_commands() -> None:
    lines = README.splitlines()
    assert 150 <= len(lines) <= 250, len(lines)
    assert SETUP in lines and TEST in lines
    assert lines.index(SETUP) < lines.index(TEST)
    assert "<!--" not in README


def test_readme_links_point_to_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing


def test_readme_python_snippets_run(tmp_path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=str(tmp_path), timeout=120,
                             env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, f"README python block {i + 1}:\n{code}\n{res.stderr[-3000:]}"
