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


# --- Rooms talk through public names; families meet in the registry ---------
BENCH = ROOT / 'benchmarks'
TESTS = ROOT / 'tests'
CONFIG_CLASSES = {'TransformerConfig', 'Gemma4Config', 'Transformer', 'Gemma4'}


def py_files(*roots: Path):
  return sorted(p for r in roots if r.exists() for p in r.rglob('*.py')
                if '.venv' not in p.parts)


def gemma_mt_modules() -> set[str]:
  return {module_name(p) for p in PKG.rglob('*.py')}


def private_uses(path: Path, modules: set[str]) -> list[str]:
  """`from gemma_mt.x import _name`, and `m._name` where m is a gemma_mt
  module bound by an import in `path`."""
  tree = ast.parse(path.read_text())
  aliases, found = {}, []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('gemma_mt'):
      for a in node.names:
        if a.name.startswith('_'):
          found.append(f'{path.name}:{node.lineno} imports {node.module}.{a.name}')
        if f'{node.module}.{a.name}' in modules:
          aliases[a.asname or a.name] = f'{node.module}.{a.name}'
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name in modules and a.asname:
          aliases[a.asname] = a.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith('_')
        and not node.attr.startswith('__')):
      found.append(f'{path.name}:{node.lineno} uses '
                   f'{aliases[node.value.id]}.{node.attr}')
  return found


def test_no_private_names_across_modules():
  """No module, benchmark or test reaches into another module's private
  names: what one room needs of another is public."""
  modules = gemma_mt_modules()
  bad = [u for p in py_files(PKG, BENCH, TESTS) for u in private_uses(p, modules)
         if not (p.is_relative_to(PKG) and module_name(p) in u.split(' ')[-1])]
  assert not bad, '\n'.join(bad)


def test_private_use_finder_finds_one(tmp_path):
  f = tmp_path / 'x.py'
  f.write_text('from gemma_mt.decoding import sampler as S\n'
               'from gemma_mt.models.gemma import _hidden\nS._check(1)\n')
  found = private_uses(f, {'gemma_mt.decoding.sampler', 'gemma_mt.models.gemma'})
  assert len(found) == 2, found


def family_tests(path: Path) -> list[str]:
  """isinstance checks against a family's config or module, and mentions
  of a family's names, in `path`."""
  tree = ast.parse(path.read_text())
  found = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == 'isinstance' and len(node.args) == 2):
      names = {n.id if isinstance(n, ast.Name) else getattr(n, 'attr', None)
               for n in ast.walk(node.args[1])}
      if names & CONFIG_CLASSES:
        found.append(f'{path.name}:{node.lineno} isinstance family test')
    if isinstance(node, ast.Compare) and any(
        isinstance(n, ast.Attribute) and n.attr == 'family'
        for n in ast.walk(node)):
      found.append(f'{path.name}:{node.lineno} compares .family')
    if isinstance(node, (ast.Name, ast.Attribute)) and (
        getattr(node, 'id', None) == 'Gemma4Config'
        or getattr(node, 'attr', None) == 'Gemma4Config'):
      found.append(f'{path.name}:{node.lineno} names Gemma4Config')
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.endswith('gemma4') or any(a.name == 'gemma4' for a in node.names)):
      found.append(f'{path.name}:{node.lineno} imports gemma4')
  return found


def test_families_meet_only_in_the_registry():
  """Outside `models/` no code asks which family it holds: it calls the
  config's protocol (`models.ModelConfig`); benchmarks likewise."""
  models_dir = PKG / 'models'
  bad = [f for p in py_files(PKG, BENCH) if not p.is_relative_to(models_dir)
         for f in family_tests(p)]
  assert not bad, '\n'.join(bad)
  inside = [f for p in py_files(models_dir) if p.name not in
            ('registry.py', 'gemma4.py', 'gemma.py') for f in family_tests(p)]
  assert not inside, '\n'.join(inside)


def test_family_finder_finds_them(tmp_path):
  f = tmp_path / 'x.py'
  f.write_text('from gemma_mt.models import gemma4\n'
               'if isinstance(c, TransformerConfig) or c.family == "g": pass\n')
  assert len(family_tests(f)) == 3


def test_benchmarks_use_the_public_api_only():
  """Benchmarks are users of the package: no sys.path edits, no private
  names (checked above), run as `python -m benchmarks.<name>`."""
  files = py_files(BENCH)
  assert files, 'benchmarks/ is missing'
  edits = [f'{p.name}' for p in files if 'sys.path' in p.read_text()]
  assert not edits, edits
