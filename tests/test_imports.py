"The package's modules import each other without a cycle, directly or through others, lazily or at the top"
import ast
from pathlib import Path
import pytest

PACKAGE = Path(__file__).parent.parent / 'fastxtend_optim'

def package_imports(source:str, modules:set[str]) -> set[str]:
    "The package modules that `source` imports anywhere (inside functions too), relative or absolute"
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ''
            if node.level == 1: found |= {name.split('.')[0]} if name else {a.name for a in node.names}
            elif name.startswith('fastxtend_optim.'): found.add(name.split('.')[1])
            elif name == 'fastxtend_optim': found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('fastxtend_optim.')}
    return found & modules

def import_graph(sources:dict[str, str]) -> dict[str, set[str]]:
    return {m: package_imports(src, set(sources)) for m, src in sources.items()}

def cycle(graph:dict[str, set[str]]) -> list[str]|None:
    "One import cycle in `graph` as a path of modules ending where it began, or `None`"
    done, path = set(), []
    def visit(m):
        if m in path: return path[path.index(m):] + [m]
        if m in done: return None
        path.append(m)
        for n in sorted(graph[m]):
            if (found := visit(n)): return found
        path.pop(); done.add(m)
    for m in sorted(graph):
        if (found := visit(m)): return found
    return None

def package_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in PACKAGE.glob('*.py') if p.stem not in ('__init__', '_modidx')}

def test_no_module_imports_itself_through_others():
    graph = import_graph(package_sources())
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"
    assert graph['base'] <= {'lowbit'} and not graph['lowbit'], "the ground floor imports only what imports nothing"
    assert {'fused', 'eightbit'} <= graph['core'] and 'core' not in graph['fused'] | graph['eightbit']

def test_the_reader_finds_lazy_and_relative_cycles():
    sources = {'a': 'from .b import x', 'b': 'def f():\n    from fastxtend_optim.c import y', 'c': 'import fastxtend_optim.a',
               'd': 'from . import a'}
    graph = import_graph(sources)
    assert graph == {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
    assert cycle(graph) == ['a', 'b', 'c', 'a']
    assert cycle({'a': {'b'}, 'b': set()}) is None
