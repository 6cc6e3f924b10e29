"""Shapes10: a small dataset drawn by code, shipped with the project as a TFDS builder.

What it is: 10 classes of 32x32 RGB images drawn procedurally (five shapes,
five textures; see `CLASS_NAMES`), 5,000 training and 1,000 test examples,
as the TFDS dataset `shapes10` (registered when this module is imported):

    import embedded_dataset
    builder = embedded_dataset.load_builder()          # prepares on first use
    ds = builder.as_dataset(split='train', as_supervised=True)

or `tfds.load('shapes10')` after `import embedded_dataset`.

Why it exists: the real datasets (CIFAR-10, ImageNet) need a download or
`../shared/tfds`; Shapes10 needs neither, so the quick-start and the tests can
pretrain, fine-tune and evaluate end to end offline, in seconds, on a CPU.
Nothing is downloaded: `_split_generators` ignores the download manager and
every image is drawn from numpy; the whole dataset is generated and written
by `download_and_prepare()` in a few seconds on 2 CPU cores.

How it is drawn: example `i` of a split has class `i % 10` (so every class has
exactly a tenth of each split) and everything else (position, size, rotation,
stripe period and phase, which of four colour pairs, noise level and the
noise itself) comes from `np.random.RandomState([_SEED, split, i])`, so
preparing again, anywhere, gives byte-identical images. Colours are drawn
independently of the class, from four pairs of a light and a dark colour so
that the pattern survives SimCLR's grayscale and colour jitter; colour
therefore does not identify the class, the geometry does. The pairs are few
(version 2): contrastive pretraining learns from what tells images apart, and
with a random pair per image (version 1) that was the colour. Shapes are
large and near the centre and textures fill the whole image, so a random
crop of a reasonable size keeps the class.

It must stay learnable: the quick-start and the tests rely on a small model
getting clearly above chance (10%) on it, and `tests/test_embedded_dataset.py`
checks that a linear classifier on simple translation-invariant features does.
When changing the drawing, keep the classes distinguishable by shape, not by
colour, keep the data deterministic, and bump `VERSION` (prepared copies of an
older version would otherwise be reused).
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = 'shapes10'
IMAGE_SIZE = 32
CLASS_NAMES = (
    'circle', 'square', 'triangle', 'cross', 'ring',
    'horizontal_stripes', 'vertical_stripes', 'diagonal_stripes',
    'checkerboard', 'dots',
)
SPLIT_SIZES = {'train': 5000, 'test': 1000}

_SEED = 20200213  # SimCLR's arXiv date; any constant works, changing it changes the data.
_SPLIT_INDEX = {'train': 0, 'test': 1}
_SHAPES = frozenset(range(5))  # class ids drawn as one object near the centre
# Foreground/background colours: black on white, white on black, navy on
# yellow, yellow on navy. Few on purpose: SimCLR tells the images of a batch
# apart by whatever survives its augmentations, and a random colour pair per
# image (version 1) did, so the encoder learnt colours, not shapes. With four
# pairs, colours leave the images of a batch in four groups, and only the
# geometry tells them apart within one. Both colours of a pair differ in
# luminance, so grayscale keeps the pattern.
_NAVY, _YELLOW = (0.10, 0.15, 0.50), (0.95, 0.85, 0.30)
_COLOUR_PAIRS = tuple(
    (np.array(fg), np.array(bg)) for fg, bg in (
        ((0.0,) * 3, (1.0,) * 3), ((1.0,) * 3, (0.0,) * 3),
        (_NAVY, _YELLOW), (_YELLOW, _NAVY)))

_DESCRIPTION = """\
Shapes10: 10 classes of procedurally drawn 32x32 RGB images (circle, square,
triangle, cross, ring, horizontal stripes, vertical stripes, diagonal stripes,
checkerboard, dots) with random position, size, rotation, one of four colour
pairs and noise. Generated offline and deterministically by
`embedded_dataset.py` (no download); meant for quick-starts and tests.
"""


def _draw_params(rng, label):
  """Draws the random parameters of one example from its own RandomState."""
  two_pi = 2 * np.pi
  if label in _SHAPES:
    size = rng.uniform(6.5, 11.0)  # radius-like size in pixels
    centre = 16.0 + rng.uniform(-4.5, 4.5, size=2)
    angle = rng.uniform(0.0, two_pi)
    extra = rng.uniform(0.45, 0.65)  # ring: inner/outer radius; cross: unused
  else:
    jitter = np.deg2rad(rng.uniform(-12.0, 12.0))
    if label == 5:     # horizontal stripes vary along y
      size, angle = rng.uniform(5.0, 10.0), jitter
    elif label == 6:   # vertical stripes vary along x
      size, angle = rng.uniform(5.0, 10.0), jitter
    elif label == 7:   # diagonal, either direction
      size = rng.uniform(5.0, 10.0)
      angle = np.pi / 4 * (1 if rng.rand() < 0.5 else -1) + jitter
    elif label == 8:   # checkerboard cell size
      size, angle = rng.uniform(3.5, 7.0), jitter
    else:              # dots: grid period
      size, angle = rng.uniform(6.0, 10.0), rng.uniform(0.0, two_pi)
    centre = rng.uniform(0.0, 2 * size, size=2)  # phase of the pattern
    extra = rng.uniform(0.25, 0.35)  # dots: radius / period; stripes: unused
  # One of a few colour pairs, independent of the class (see _COLOUR_PAIRS).
  fg, bg = _COLOUR_PAIRS[rng.randint(len(_COLOUR_PAIRS))]
  sigma = rng.uniform(0.0, 0.06)
  noise = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return (size, centre[0], centre[1], angle, extra), fg, bg, sigma * noise


def _masks(label, params):
  """Foreground masks of one class for a batch: params [N, 5] -> [N, 32, 32]."""
  size, cx, cy, angle, extra = (params[:, k, None, None] for k in range(5))
  pix = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5
  x, y = pix[None, None, :], pix[None, :, None]
  cos, sin = np.cos(angle), np.sin(angle)
  u = (x - cx) * cos + (y - cy) * sin     # rotated coordinates around the
  v = -(x - cx) * sin + (y - cy) * cos    # centre (shapes) or phase (textures)
  if label == 0:
    return u * u + v * v <= size * size
  if label == 1:
    return np.maximum(abs(u), abs(v)) <= 0.8 * size
  if label == 2:  # equilateral triangle, circumradius 1.2 * size
    r = 1.2 * size
    inside = np.ones(u.shape, bool)
    for k in range(3):
      a = -np.pi / 2 + 2 * np.pi * k / 3
      inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
    return inside
  if label == 3:
    w = 0.3 * size
    return ((abs(u) <= w) & (abs(v) <= size)) | ((abs(v) <= w) & (abs(u) <= size))
  if label == 4:
    d2 = u * u + v * v
    return (d2 <= size * size) & (d2 >= (extra * size) ** 2)
  if label in (5, 7):
    return np.mod(v, size) < size / 2
  if label == 6:
    return np.mod(u, size) < size / 2
  if label == 8:
    return (np.floor(u / size) + np.floor(v / size)) % 2 == 0
  du, dv = np.mod(u, size) - size / 2, np.mod(v, size) - size / 2
  return du * du + dv * dv <= (extra * size) ** 2


def draw_examples(split, indices):
  """Draws examples of a split.

  Args:
    split: 'train' or 'test'.
    indices: example indices within the split (any ints >= 0).

  Returns:
    images: uint8 [N, 32, 32, 3]; labels: int64 [N] (class `i % 10`).
  """
  if split not in _SPLIT_INDEX:
    raise ValueError(f'split={split!r}: expected one of {sorted(_SPLIT_INDEX)}')
  indices = np.asarray(indices, np.int64).reshape(-1)
  labels = indices % len(CLASS_NAMES)
  n = len(indices)
  params = np.empty((n, 5))
  fg, bg = np.empty((n, 3)), np.empty((n, 3))
  noise = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
  for j, (i, label) in enumerate(zip(indices, labels)):
    rng = np.random.RandomState([_SEED, _SPLIT_INDEX[split], int(i)])
    params[j], fg[j], bg[j], noise[j] = _draw_params(rng, int(label))
  mask = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), bool)
  for label in range(len(CLASS_NAMES)):  # one vectorised pass per class
    sel = labels == label
    if sel.any():
      mask[sel] = _masks(label, params[sel])
  img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
  img = img.astype(np.float32) + noise
  images = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  return images, labels


class Shapes10(tfds.core.GeneratorBasedBuilder):
  """Shapes10: procedurally drawn 32x32 shapes and textures, 10 classes."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': 'Colours from four fixed pairs, so that SimCLR learns shapes.',
  }

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage=None,
        citation=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: everything is drawn here
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    images, labels = draw_examples(split, np.arange(SPLIT_SIZES[split]))
    for i, (image, label) in enumerate(zip(images, labels)):
      key = f'{split}_{i:05d}'
      yield key, {'image': image, 'label': int(label), 'id': key}


def load_builder(data_dir=None):
  """Returns the Shapes10 builder, prepared (drawn and written) on first use.

  Args:
    data_dir: where TFDS keeps prepared data; None means the TFDS default
      (`TFDS_DATA_DIR`, else ~/tensorflow_datasets). A `gs://` path works.

  Returns:
    A prepared `Shapes10` builder; `builder.as_dataset(split=...)` reads it.
  """
  builder = Shapes10(data_dir=data_dir)
  builder.download_and_prepare()  # no-op when already prepared
  return builder


if __name__ == '__main__':
  import sys
  import time
  start = time.perf_counter()
  b = load_builder(sys.argv[1] if len(sys.argv) > 1 else None)
  print(f'{NAME} ready in {b.data_dir} ({time.perf_counter() - start:.1f} s)')
