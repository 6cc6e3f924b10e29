"""The notebooks in colabs/ run, unchanged, with tiny parameters, and print
what they should.

Each notebook is executed by nbclient in a fresh kernel of this interpreter
(ipykernel; a kernel spec written for the test, so neither `ipykernel
install` nor a user-level `python3` kernel that may point elsewhere matters),
with parameter overrides inserted as a new cell right after the cell tagged
`parameters`, as papermill does. They start from the small fine-tuned model
of conftest.tiny_teacher and read shapes10 offline, and also from a SavedModel
the original wrote (../shared/fixtures/small/r18_w0125: the released format,
whose fine-tuning through `trainable_variables_list` is what failed for users
of the original, google-research/simclr#108 and #116).
"""
import json
import re
import sys
import time

import pytest

nbformat = pytest.importorskip(
    'nbformat', reason='nbformat is not installed: pip install -r '
    'requirements-test.txt')
nbclient = pytest.importorskip(
    'nbclient', reason='nbclient is not installed: pip install -r '
    'requirements-test.txt')

import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position

COLABS = conftest.ROOT / 'colabs'
NOTEBOOKS = ('finetuning.ipynb', 'load_and_inference.ipynb',
             'distillation_self_training.ipynb')
KERNEL = 'simclr-tests'


@pytest.fixture(scope='module')
def jupyter_path(tmp_path_factory):
  """A Jupyter data dir whose only kernel runs this interpreter."""
  pytest.importorskip('ipykernel', reason='ipykernel is not installed: pip '
                      'install -r requirements-test.txt')
  root = tmp_path_factory.mktemp('jupyter')
  spec = root / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'],
      'display_name': 'SimCLR tests', 'language': 'python'}))
  return root


@pytest.fixture(scope='module')
def original_saved_model(tmp_path_factory):
  """ResNet-18 at 1/8 width with a 10-class linear head, exported by the
  original's run.py after 3 pretraining steps on random images."""
  return conftest.unpack_original_saved_model(
      'r18_w0125', tmp_path_factory.mktemp('original'))


def encoder_variable_count(saved_model):
  """How many of a SavedModel's trainable_variables_list are the encoder's:
  those a loss on final_avg_pool has gradients for."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  loaded = tf.saved_model.load(str(saved_model))
  names = [v.name for v in loaded.trainable_variables_list]
  # 'resnet/...', or 'resnet_<n>/...' for a model that was not the first
  # of its process.
  return sum(bool(re.match(r'resnet(_\d+)?/', n)) for n in names), len(names)


def on_shapes10(shapes10_dir, tmp_path):
  """The parameters every notebook test shares: shapes10 offline, 32 px,
  outputs in tmp_path/out."""
  return dict(DATASET='shapes10', DATA_DIR=str(shapes10_dir), IMAGE_SIZE=32,
              OUTPUT_DIR=str(tmp_path / 'out'))


def execute(name, tmp_path, monkeypatch, jupyter_path, **parameters):
  """Runs colabs/<name> with `parameters`; returns (stdout text, seconds).

  The executed notebook is written to tmp_path for inspection.
  """
  notebook = nbformat.read(COLABS / name, as_version=4)
  tagged = [i for i, cell in enumerate(notebook.cells)
            if 'parameters' in cell.metadata.get('tags', [])]
  assert len(tagged) == 1, f'{name}: expected one cell tagged parameters'
  lines = ['# Parameters injected by tests/test_notebooks.py']
  lines += [f'{key} = {value!r}' for key, value in parameters.items()]
  injected = nbformat.v4.new_code_cell(
      '\n'.join(lines), metadata={'tags': ['injected-parameters']})
  notebook.cells.insert(tagged[0] + 1, injected)
  # The kernel inherits this environment: CPU only, quiet TensorFlow.
  monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '2')
  monkeypatch.setenv('JUPYTER_PATH', str(jupyter_path))
  client = nbclient.NotebookClient(
      notebook, timeout=600, kernel_name=KERNEL,
      resources={'metadata': {'path': str(COLABS)}})
  start = time.time()
  try:
    client.execute()
  finally:
    nbformat.write(notebook, tmp_path / name)
  seconds = time.time() - start
  text = ''.join(output.get('text', '')
                 for cell in notebook.cells if cell.cell_type == 'code'
                 for output in cell.get('outputs', [])
                 if output.get('name') == 'stdout')
  print(f'{name}: {seconds:.0f} s')
  return text, seconds


def _value(pattern, text):
  found = re.search(pattern, text)
  assert found, f'{pattern!r} not printed:\n{text[-3000:]}'
  return found.groups() if len(found.groups()) > 1 else found.group(1)


def _has_matplotlib():
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def _check_figure(path):
  if _has_matplotlib():
    assert path.stat().st_size > 5000, path  # a real PNG, not an empty one
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_stored_without_outputs_and_with_parameters(name):
  notebook = json.loads((COLABS / name).read_text())
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  assert all(not c['outputs'] and c['execution_count'] is None for c in code)
  assert 'parameters' in code[0]['metadata'].get('tags', [])
  assert "'<you>'" in ''.join(code[1]['source'])  # the guarded clone
  assert notebook['metadata']['kernelspec']['name'] == 'python3'  # Colab's


def test_finetuning(tiny_teacher, shapes10_dir, tmp_path, monkeypatch,
                    jupyter_path):
  text, _ = execute(
      'finetuning.ipynb', tmp_path, monkeypatch, jupyter_path,
      SAVED_MODEL=str(tiny_teacher), TRAIN_SPLIT='train', EVAL_SPLIT='test',
      BATCH_SIZE=32, LINEAR_EXAMPLES=1000, LINEAR_STEPS=100,
      LINEAR_LEARNING_RATE=0.05, FINETUNE_STEPS=40,
      FINETUNE_LEARNING_RATE=0.002, EVAL_EXAMPLES=500,
      **on_shapes10(shapes10_dir, tmp_path))
  assert 'final_avg_pool: (1, 64)' in text  # ResNet-18 at 1/8 width
  linear = float(_value(r'linear head accuracy: ([0-9.]+)', text))
  finetuned = float(_value(r'fine-tuned accuracy: ([0-9.]+)', text))
  # The features of a model trained on shapes10: far above chance (0.1).
  # Measured: linear 0.80-0.84; fine-tuned 0.73-0.80 after 40 steps at 0.002
  # (after 20 steps 0.59-0.81: batch norm's moving averages follow the last
  # few batches of crops; at 0.01 the first steps cost more).
  assert 0.5 < linear <= 1, text
  assert 0.4 < finetuned <= 1, text
  assert 'step 40/40: loss' in text
  encoder, total = encoder_variable_count(tiny_teacher)
  assert f'fine-tuning changed {encoder} of the {total} variables' in text
  _check_figure(tmp_path / 'out' / 'finetuning_loss.png')


def test_finetuning_a_savedmodel_of_the_original(
    original_saved_model, shapes10_dir, tmp_path, monkeypatch, jupyter_path):
  """Its weights come from 3 steps on random images, so no accuracy is
  asserted: what matters is that gradients reach every encoder variable of
  the released format (63 for this ResNet-18; the heads get none through
  final_avg_pool)."""
  text, _ = execute(
      'finetuning.ipynb', tmp_path, monkeypatch, jupyter_path,
      SAVED_MODEL=str(original_saved_model), TRAIN_SPLIT='train',
      EVAL_SPLIT='test', BATCH_SIZE=32, LINEAR_EXAMPLES=256, LINEAR_STEPS=10,
      LINEAR_LEARNING_RATE=0.05, FINETUNE_STEPS=5,
      FINETUNE_LEARNING_RATE=0.01, EVAL_EXAMPLES=64,
      **on_shapes10(shapes10_dir, tmp_path))
  for line in ('loaded in', 'final_avg_pool: (1, 64)', 'logits_sup: (1, 10)',
               'proj_head_output: (1, 128)', 'step 5/5: loss'):
    assert line in text, text
  encoder, total = encoder_variable_count(original_saved_model)
  assert (encoder, total) == (63, 73)
  assert f'fine-tuning changed {encoder} of the {total} variables' in text


def test_load_and_inference(tiny_teacher, shapes10_dir, tmp_path,
                            monkeypatch, jupyter_path):
  # One image of the dataset also given as a file, to read both ways.
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import embedded_dataset  # pylint: disable=import-outside-toplevel
  example = next(iter(embedded_dataset.load_builder(str(shapes10_dir))
                      .as_dataset(split='test').take(1)))
  png = tmp_path / 'first_test_image.png'
  png.write_bytes(tf.io.encode_png(example['image']).numpy())
  text, _ = execute(
      'load_and_inference.ipynb', tmp_path, monkeypatch, jupyter_path,
      SAVED_MODEL=str(tiny_teacher), CLASS_NAMES_URL=None, SPLIT='test',
      NUM_IMAGES=3, IMAGE_FILES=[str(png)],
      **on_shapes10(shapes10_dir, tmp_path))
  assert 'images: (4, 32, 32, 3)' in text
  # ResNet-18 at 1/8 width, CIFAR stem: 8 to 64 channels, 32 to 4 pixels.
  for name, shape in [('block_group1', (4, 32, 32, 8)),
                      ('block_group2', (4, 16, 16, 16)),
                      ('block_group3', (4, 8, 8, 32)),
                      ('block_group4', (4, 4, 4, 64)),
                      ('final_avg_pool', (4, 64)), ('logits_sup', (4, 10))]:
    assert f'{name}: {shape}' in text, text
  top5 = re.findall(r'image (\d) \((.*)\) top-5: (.*)', text)
  assert [int(i) for i, _, _ in top5] == [0, 1, 2, 3]
  names = set(embedded_dataset.CLASS_NAMES)
  for _, _, shown in top5:
    pairs = [p.rsplit(' ', 1) for p in shown.split(', ')]
    assert len(pairs) == 5 and all(n in names for n, _ in pairs)
    probs = [float(p) for _, p in pairs]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.001
  # The first dataset image and the PNG of it get the same predictions.
  assert top5[0][2] == top5[3][2] and top5[3][1] == png.name
  assert float(_value(r'max \|difference\| of logits ([0-9.e+-]+)',
                      text)) < 1e-4
  for figure in ('predictions.png', 'feature_maps.png',
                 'channels_image0.png'):
    _check_figure(tmp_path / 'out' / figure)


def test_load_and_inference_on_a_savedmodel_of_the_original(
    original_saved_model, shapes10_dir, tmp_path, monkeypatch, jupyter_path):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import data_util  # pylint: disable=import-outside-toplevel
  import embedded_dataset  # pylint: disable=import-outside-toplevel
  text, _ = execute(
      'load_and_inference.ipynb', tmp_path, monkeypatch, jupyter_path,
      SAVED_MODEL=str(original_saved_model), CLASS_NAMES_URL=None,
      SPLIT='test', NUM_IMAGES=3, IMAGE_FILES=[],
      **on_shapes10(shapes10_dir, tmp_path))
  for name, shape in [('block_group1', (3, 32, 32, 8)),
                      ('block_group4', (3, 4, 4, 64)),
                      ('final_avg_pool', (3, 64)), ('logits_sup', (3, 10))]:
    assert f'{name}: {shape}' in text, text
  assert 'serving signature' not in text  # the released format has none
  # The same top-5 from plain TensorFlow in this process.
  examples = embedded_dataset.load_builder(str(shapes10_dir)).as_dataset(
      split='test').take(3)
  images = tf.stack([data_util.preprocess_image(
      e['image'], 32, 32, is_training=False, test_crop=False)
                     for e in examples])
  logits = tf.saved_model.load(str(original_saved_model))(
      images, trainable=False)['logits_sup']
  top5 = tf.math.top_k(tf.nn.softmax(logits), k=5)
  shown = re.findall(r'image \d \(.*\) top-5: (.*)', text)
  assert len(shown) == 3
  for i, line in enumerate(shown):
    expected = ', '.join(
        f'{embedded_dataset.CLASS_NAMES[c]} {p:.3f}'
        for p, c in zip(top5.values[i].numpy(), top5.indices[i].numpy()))
    assert line == expected


def test_distillation(tiny_teacher, shapes10_dir, tmp_path, monkeypatch,
                      jupyter_path):
  text, _ = execute(
      'distillation_self_training.ipynb', tmp_path, monkeypatch,
      jupyter_path,
      TEACHER=str(tiny_teacher), TRAIN_SPLIT='train', EVAL_SPLIT='test',
      STUDENT_WIDTH=0.0625, TEMPERATURE=2.0, ALPHA=0.9,
      BATCH_SIZE=64, STEPS=200, LEARNING_RATE=0.005, EVAL_EXAMPLES=1000,
      EXPORT_SAVED_MODEL=True, **on_shapes10(shapes10_dir, tmp_path))
  assert 'teacher: 10 classes' in text
  agreement, commonest = (float(v) for v in _value(
      r'student agreement with teacher: ([0-9.]+) .* commonest class is '
      r'([0-9.]+)', text))
  accuracy = float(_value(r'student accuracy: ([0-9.]+)', text))
  assert 0 <= agreement <= 1 and 0 < commonest <= 1
  print({'agreement': agreement, 'commonest': commonest,
         'accuracy': accuracy})
  # A student half the teacher's width, tau=2 and 10% labelled loss:
  # measured agreement 0.68-0.80 on the 1000 test images where the teacher's
  # commonest class covers 0.28-0.37 of its predictions (what a constant
  # student would agree), accuracy 0.39-0.58 (chance 0.1). With tau=1 and no
  # labels: agreement 0.64-0.80 against 0.23-0.41.
  assert agreement > commonest + 0.1, text
  assert accuracy > 0.25, text
  assert (tmp_path / 'out' / 'ckpt-200.index').exists()
  assert (tmp_path / 'out' / 'saved_model' / 'saved_model.pb').exists()
  _check_figure(tmp_path / 'out' / 'distillation_curves.png')


def test_distillation_from_a_savedmodel_of_the_original(
    original_saved_model, shapes10_dir, tmp_path, monkeypatch, jupyter_path):
  """The released format as the teacher: its logits_sup are read and the
  student trains on them (this teacher saw random images only, so no
  agreement is asserted)."""
  text, _ = execute(
      'distillation_self_training.ipynb', tmp_path, monkeypatch,
      jupyter_path, TEACHER=str(original_saved_model), TRAIN_SPLIT='train',
      EVAL_SPLIT='test', STUDENT_WIDTH=0.0625, TEMPERATURE=1.0, ALPHA=1.0,
      BATCH_SIZE=32, STEPS=10, LEARNING_RATE=0.005, EVAL_EXAMPLES=64,
      EXPORT_SAVED_MODEL=False, **on_shapes10(shapes10_dir, tmp_path))
  assert 'teacher: 10 classes' in text
  _value(r'student agreement with teacher: ([0-9.]+)', text)
  assert (tmp_path / 'out' / 'ckpt-10.index').exists()
