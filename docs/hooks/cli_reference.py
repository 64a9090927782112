"""MkDocs hook: the CLI reference page (``cli.md``), generated from ``itop.app.cli.build_parser()``
at every build, so the page lists exactly the options the installed command accepts.

``markdown(parser)`` renders any ``argparse`` parser with sub-commands; tests/test_docs_site.py
checks that it covers every option of the real parser.
"""
from __future__ import annotations

import argparse
from typing import List

INTRO = """# CLI reference

The `itop` command has three sub-commands: `train` (dense, static sparse or dynamic sparse
training of a paper model), `report` (tables and plots of a run directory) and `bench` (the
benchmark scripts in quick mode). It needs the application's packages:
`pip install -e ".[cli]"` in a checkout. `python -m itop ...` is the same command, and
`torchrun --nproc_per_node N -m itop train --out DIR ...` runs it on N processes.

This page is generated from the argument parser when the documentation is built
(`docs/hooks/cli_reference.py`), so it always lists the options of this version.
"""


#: What an option without a ``help`` string means (the parser's own help wins when it has one).
FALLBACK_HELP = {
    "--epochs": "training epochs (× --multiplier)",
    "--momentum": "SGD momentum (Nesterov when > 0)",
    "--weight-decay": "SGD weight decay",
    "--label-smoothing": "label smoothing of the cross-entropy loss",
    "--seed": "seed of the model's initialization, the data order and the topology manager",
    "--device": "cpu, cuda or cuda:N",
    "--model": "the network (see itop/app/models.py)",
    "--data": "the data set: mnist1d is generated locally, digits ships with scikit-learn, "
              "cifar10/cifar100 are read from --data-dir (downloaded when online), synthetic "
              "is a small generated task for smoke tests",
}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _help(action: argparse.Action, prog: str) -> str:
    """The action's help with ``%(default)s``-style fields filled in, as argparse prints it."""
    if not action.help or action.help is argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if isinstance(action, argparse._StoreTrueAction) else "on"
    if action.default is None or action.default is argparse.SUPPRESS:
        return "–"
    if isinstance(action.default, (list, tuple)):
        return "`" + " ".join(map(str, action.default)) + "`"
    return f"`{action.default}`"


def _names(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    metavar = ""
    if action.nargs != 0:
        if action.choices is not None and action.metavar is None:
            metavar = ""
        else:
            metavar = " " + (action.metavar or action.dest.upper())
            if action.nargs == "?":
                metavar = f" [{metavar.strip()}]"
            elif action.nargs in ("+", "*"):
                metavar = f" {metavar.strip()} ..."
    return ", ".join(f"`{o}{metavar}`" for o in action.option_strings)


def _meaning(action: argparse.Action, prog: str) -> str:
    parts = []
    h = _help(action, prog) or next((FALLBACK_HELP[o] for o in action.option_strings
                                     if o in FALLBACK_HELP), "")
    if h:
        parts.append(h)
    if action.choices is not None and not isinstance(action.choices, dict):
        parts.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.required and action.option_strings:
        parts.append("required")
    return _cell("; ".join(parts))


def _subcommand(name: str, sub: argparse.ArgumentParser) -> List[str]:
    out = [f"## `itop {name}`", ""]
    if sub.description:
        out += [sub.description, ""]
    out += ["```text", sub.format_usage().strip(), "```", ""]
    for group in sub._action_groups:
        actions = [a for a in group._group_actions
                   if not isinstance(a, argparse._HelpAction) and a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        title = group.title or "arguments"
        out += [f"### {title[0].upper() + title[1:]}", ""]
        exclusive = [g for g in sub._mutually_exclusive_groups
                     if set(g._group_actions) & set(actions)]
        out += ["| option | default | meaning |", "|---|---|---|"]
        for a in actions:
            out.append(f"| {_names(a)} | {_default(a)} | {_meaning(a, sub.prog)} |")
        for g in exclusive:
            out += ["", "Only one of " + ", ".join(f"`{a.option_strings[0]}`"
                                                   for a in g._group_actions) + "."]
        out.append("")
    return out


def markdown(parser: argparse.ArgumentParser) -> str:
    """The reference page for ``parser``: one section per sub-command, one table per group."""
    out = [INTRO]
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for name, sub in action.choices.items():
            out += _subcommand(name, sub)
    return "\n".join(out).rstrip() + "\n"


def on_files(files, config):
    """Add the generated ``cli.md`` to the site's files."""
    from mkdocs.structure.files import File

    from itop.app.cli import build_parser
    files.append(File.generated(config, "cli.md", content=markdown(build_parser())))
    return files
