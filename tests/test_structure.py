# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The package's floor plan (docs/concepts.rst): the import graph of psfdeconv's
modules, drawn from their source with `ast` (imports inside functions included),
runs one way, from the foundations through the stages and the workflows to the
command line, with no cycle and no private name crossing a module."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'psfdeconv'

#: The layers, lowest first; a module may import from its own layer or a lower one.
#: A name ending in '.' stands for every module of that subpackage.
LAYERS = {
    'foundations': ('psfdeconv', 'psfdeconv._version', 'psfdeconv._warnings',
                    'psfdeconv.exceptions', 'psfdeconv._fourier', 'psfdeconv._validation',
                    'psfdeconv._units', 'psfdeconv._cpus', 'psfdeconv._offload',
                    'psfdeconv._segments',
                    'psfdeconv.flags', 'psfdeconv.io', 'psfdeconv.io.'),
    'stages': ('psfdeconv.simulate', 'psfdeconv.background', 'psfdeconv.psf',
               'psfdeconv.detection', 'psfdeconv.cutouts', 'psfdeconv.features',
               'psfdeconv.model', 'psfdeconv.inference', 'psfdeconv.measure',
               'psfdeconv.transforms',
               'psfdeconv.target', 'psfdeconv.deconvolve', 'psfdeconv.shear_response',
               'psfdeconv.shear', 'psfdeconv.calibrate', 'psfdeconv.train'),
    'workflows': ('psfdeconv.pipeline', 'psfdeconv.batch', 'psfdeconv.evaluate',
                  'psfdeconv.evaluate.', 'psfdeconv.plotting'),
    'command line': ('psfdeconv.cli',),
}


def _module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def _is_module(name):
    path = PACKAGE.parent.joinpath(*name.split('.'))
    return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def _imports():
    """(importer, imported module, imported name or None, line) for every
    package-internal import."""
    found = []
    for path in sorted(PACKAGE.rglob('*.py')):
        importer = _module_name(path)
        package = importer if path.name == '__init__.py' else importer.rpartition('.')[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found += [(importer, alias.name, None, node.lineno) for alias in node.names
                          if alias.name.split('.')[0] == 'psfdeconv']
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split('.')[:len(package.split('.')) - node.level + 1]
                    module = '.'.join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ''
                if module.split('.')[0] != 'psfdeconv':
                    continue
                for alias in node.names:
                    if _is_module(f'{module}.{alias.name}'):
                        found.append((importer, f'{module}.{alias.name}', None, node.lineno))
                    else:
                        found.append((importer, module, alias.name, node.lineno))
    return found


IMPORTS = _imports()
MODULES = sorted({_module_name(path) for path in PACKAGE.rglob('*.py')})


def _layer(module):
    for index, names in enumerate(LAYERS.values()):
        if module in names or any(name.endswith('.') and module.startswith(name)
                                  for name in names):
            return index
    return None


def _graph():
    graph = {module: set() for module in MODULES}
    for importer, module, _, _ in IMPORTS:
        if module != importer:
            graph[importer].add(module)
    return graph


def test_every_module_has_a_layer():
    assert [module for module in MODULES if _layer(module) is None] == []


def test_no_import_from_a_higher_layer():
    names = list(LAYERS)
    upward = [f'{importer} ({names[_layer(importer)]}) imports {module} '
              f'({names[_layer(module)]}), line {line}'
              for importer, module, _, line in IMPORTS
              if _layer(module) > _layer(importer)]
    assert upward == []


def test_no_import_cycle():
    graph = _graph()
    state = {}  # module -> 'open' while on the path, 'done' after
    cycles = []

    def visit(module, path):
        state[module] = 'open'
        for target in sorted(graph[module]):
            if state.get(target) == 'open':
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 'done'

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_private_name_crosses_a_module():
    crossing = [f'{importer} imports {name} from {module}, line {line}'
                for importer, module, name, line in IMPORTS
                if name and name.startswith('_') and not name.startswith('__')
                and module != importer]
    assert crossing == []


@pytest.mark.parametrize('module', MODULES)
def test_every_imported_name_exists(module):
    # Imports inside functions run only when the function does.
    missing = []
    for importer, target, name, line in IMPORTS:
        if importer != module or name in (None, '*'):
            continue
        if not hasattr(importlib.import_module(target), name):
            missing.append(f'{name} from {target}, line {line}')
    assert missing == []


def test_layers_as_documented():
    # The floor plan in docs/concepts.rst names the same modules.
    text = (PACKAGE.parent / 'docs' / 'concepts.rst').read_text()
    for names in LAYERS.values():
        for name in names:
            if name not in ('psfdeconv', 'psfdeconv._version') and not name.endswith('.'):
                assert name.removeprefix('psfdeconv.') in text, name
