"""The SimCLR augmentation recipe: every probability, strength and range of
the training views, defined once and read by both augmentation paths
(augment_example.py per image, augment_batch.py per batch) and by the
evaluation preprocessing.

The values are the original's (SimCLR paper, appendix A;
google-research/simclr data_util.py); tests/test_aug_distributions.py checks
both paths' views against the original's distributions.
"""

# Random resized crop: a window of this fraction of the image's area, this
# aspect ratio (width / height, relative to the output's), covering at least
# this fraction of the image, found within this many attempts (else the
# whole image), resized bicubically to the output size.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3. / 4., 4. / 3.)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 100

# Horizontal flip (the per-example path uses TensorFlow's flip op, whose
# probability is this one).
FLIP_PROBABILITY = 0.5

# Colour distortion of strength s (--color_jitter_strength): with this
# probability a jitter of brightness, contrast and saturation by up to
# JITTER_AMOUNT * s and hue by up to HUE_AMOUNT * s, in random order; then,
# with its own probability, grayscale.
COLOR_JITTER_PROBABILITY = 0.8
JITTER_AMOUNT = 0.8
HUE_AMOUNT = 0.2
GRAYSCALE_PROBABILITY = 0.2

# Gaussian blur (pretraining, batched inside the model): each image with
# this probability; one sigma per batch, uniform in this range; a kernel of
# the image height // this divisor (a tenth).
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.1, 2.0)
BLUR_KERNEL_DIVISOR = 10

# Evaluation: the centre crop keeps this fraction of the shorter side
# (relative to the output aspect) before the bicubic resize; 224 / 256.
EVAL_CROP_PROPORTION = 0.875
