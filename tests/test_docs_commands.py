# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The command lines of the exposure tutorial, run as written.

The tutorial's Python examples run as doctests; this runs its console examples
(``$ psfdeconv ...``): every one whose files ship with the repository, with the
exit status the text around it states. Commands on the reader's own files
(``g.fits``, ``sources.ecsv``) are placeholders and are only parsed.
"""

import re
import shlex
from pathlib import Path

import pytest

from psfdeconv.cli import _parser, main

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / 'docs' / 'tutorial_exposures.rst'
#: File names that stand for the reader's own data.
PLACEHOLDERS = {'g.fits', 'r.fits', 'i.fits', 'sources.ecsv'}


def console_commands(path):
    """(command, the output lines shown under it) of each ``$ psfdeconv``
    example, continuation lines joined."""
    commands = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r'\s+\$ (?:[A-Z_]+=\S+ )*(psfdeconv .*)', lines[i])
        i += 1
        if not match:
            continue
        command = match.group(1)
        while command.endswith('\\'):
            command = command[:-1] + ' ' + lines[i].strip()
            i += 1
        output = []
        while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith('$'):
            output.append(lines[i].strip())
            i += 1
        commands.append((command, output))
    return commands


def _files(argv):
    """The file names a command line names (values of --band NAME=FILE,
    --catalog, --psf psf=FILE)."""
    names = []
    for i, arg in enumerate(argv):
        if argv[i - 1] == '--band' and '=' in arg:
            names.append(arg.split('=', 1)[1])
        if argv[i - 1] == '--catalog':
            names.append(arg)
    return names


COMMANDS = console_commands(TUTORIAL)


def test_the_tutorial_has_runnable_commands():
    runnable = [c for c, _ in COMMANDS
                if not PLACEHOLDERS & {Path(f).name for f in _files(shlex.split(c)[1:])}]
    assert len(COMMANDS) >= 5 and len(runnable) >= 3


def _is_the_example_run(argv, example_argv):
    """Whether `argv` is the session's `example_run` command: the same options, apart from
    the output directory and ``--overwrite`` (which changes nothing on a new directory)."""
    def options(args):
        args = [arg for arg in args if arg != '--overwrite']
        if '--out' in args:
            i = args.index('--out')
            del args[i:i + 2]
        return sorted(args)

    return options(argv) == options(example_argv)


@pytest.mark.parametrize('command, output', COMMANDS, ids=[c for c, _ in COMMANDS])
def test_tutorial_command(command, output, tmp_path, monkeypatch, capsys, request):
    argv = shlex.split(command)[1:]
    # Every example parses.
    _parser().parse_args(argv)
    files = _files(argv)
    if PLACEHOLDERS & {Path(name).name for name in files}:
        return  # the reader's own data
    if _is_the_example_run(argv, ['run', '--example', '--plots']):
        # `psfdeconv run --example ... --plots`: the session's run of it (conftest.py),
        # shared with test_exposure_accuracy.py.
        run = request.getfixturevalue('example_run')
        assert _is_the_example_run(argv, run.argv)
        assert run.code == 0 and not any('error' in line for line in output)
        assert (run.out / 'catalog.fits').stat().st_size > 0
        return
    # Repository paths as written (the tutorial runs from the repository root), outputs in
    # a scratch directory.
    argv = [re.sub(r'(?<==)(tests/\S+)', lambda m: str(REPO / m.group(1)), arg)
            for arg in argv]
    monkeypatch.chdir(tmp_path)
    expected = 3 if any('error' in line for line in output) else 0
    assert main(argv) == expected
    captured = capsys.readouterr()
    if expected:
        # The error the tutorial shows, up to its first line break.
        assert output[0].split(':')[-1].strip() in ' '.join(captured.err.split())
    else:
        out_dir = Path(argv[argv.index('--out') + 1])
        assert (out_dir / 'catalog.fits').stat().st_size > 0


ALL_COMMANDS = [(path.name, command) for path in sorted((REPO / 'docs').glob('*.rst'))
                for command, _ in console_commands(path)]


def test_the_docs_show_commands():
    assert len(ALL_COMMANDS) >= 15


@pytest.mark.parametrize('page, command', ALL_COMMANDS,
                         ids=[f'{page}: {command}' for page, command in ALL_COMMANDS])
def test_every_documented_command_parses(page, command):
    # The other pages' commands train or simulate for minutes to hours on the reader's data:
    # they are parsed (every option exists, every value has the right type), and the
    # commands themselves are tested at small sizes in test_cli.py.
    try:
        _parser().parse_args(shlex.split(command)[1:])
    except SystemExit as exc:  # argparse's way of refusing (or of ending --help: 0)
        if exc.code != 0:
            pytest.fail(f'{page}: `{command}` does not parse (exit {exc.code})')
