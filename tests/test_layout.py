"""The package's architecture: no import cycle, even through function-level
imports, so every room can be read (and loaded) on its own."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PKG = Path(__file__).resolve().parents[1] / 'gemma_mt'


def module_name(path: Path) -> str:
  parts = path.relative_to(PKG.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
  """gemma_mt modules `path` imports anywhere in it (top level or not)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    found |= {n for n in names if n in modules}
  return found


def import_graph() -> dict[str, set[str]]:
  files = {module_name(p): p for p in PKG.rglob('*.py')}
  graph = {m: imports_of(p, set(files)) - {m} for m, p in files.items()}
  # Importing a.b runs a/__init__ first (unless a is m's own package,
  # which is already being imported when m runs).
  for m in list(graph):
    own = set(_with_parents(m))
    graph[m] = {d for dep in graph[m] for d in _with_parents(dep)} - own
  return graph


def _with_parents(name: str):
  parts = name.split('.')
  return ['.'.join(parts[:i]) for i in range(2, len(parts) + 1)]


def find_cycle(graph):
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 'open':
        return stack[stack.index(d):] + [d]
      if d not in state and (c := visit(d)):
        return c
    state[m] = 'done'
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state and (c := visit(m)):
      return c
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert 'gemma_mt.weights.gguf' in graph and graph['gemma_mt.translate']
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


@pytest.mark.parametrize('cli', ['translate', 'evaluate', 'serve', 'train'])
def test_help_starts_without_jax(cli):
  """`--help` answers before the heavy imports (jax, the model)."""
  mod = 'train.main' if cli == 'train' else cli
  code = (f'import sys; import gemma_mt.{mod} as m; rc = m.main(["--help"]); '
          'assert "jax" not in sys.modules, "jax imported"; print("ok", rc)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, cwd=ROOT)
  assert out.stdout.strip().endswith('ok 0'), out.stderr[-2000:]
