"""The modules' imports form no cycle and nothing imports run.py (the
command line): read from the source with `ast`, nothing is imported."""
import ast
import pathlib

import conftest

ROOT = conftest.ROOT


def top_level_modules():
  return {p.stem: p for p in ROOT.glob('*.py')}


def project_imports(path, modules):
  """The project modules `path` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names = [node.module or '']
    else:
      continue
    found.update(n.split('.')[0] for n in names
                 if n.split('.')[0] in modules)
  return found


def find_cycle(graph):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for other in sorted(graph[module]):
      if state.get(other) == 'open':
        return stack[stack.index(other):] + [other]
      if other not in state:
        cycle = visit(other)
        if cycle:
          return cycle
    state[module] = 'done'
    stack.pop()
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def import_graph():
  modules = top_level_modules()
  return {name: project_imports(path, modules)
          for name, path in modules.items()}


def test_no_module_imports_run_py():
  importers = sorted(m for m, deps in import_graph().items() if 'run' in deps)
  assert not importers, f'{importers} import run.py (the command line)'
  for folder in ('bench', 'tools'):
    for path in (ROOT / folder).glob('*.py'):
      assert 'run' not in project_imports(path, top_level_modules()), path


def test_imports_form_no_cycle():
  graph = import_graph()
  assert len(graph) > 15 and graph['run']  # the modules were read
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_checker_sees_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == [
      'a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None
  # distill.py once imported run.py, which imported distill.
  assert find_cycle({'run': {'distill'}, 'distill': {'run'}}) == [
      'distill', 'run', 'distill']
