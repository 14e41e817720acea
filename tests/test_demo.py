"""The demo's fixed colour classifier (data/demo.py classify_colour; bench/demo_prompts.py reads the demo's samples
with it): it must read every generated demo image as the colour its caption names, and find no shape in a blank or a
noise image. Reference: the images' own captions (make_demo_dataset writes colour and shape into the file name)."""
import os

import numpy as np
from PIL import Image

from data.demo import classify_colour, make_demo_dataset


def test_classifier_reads_the_demo_images(tmp_path):
    paths = make_demo_dataset(str(tmp_path), n=24)
    for p in paths:
        with Image.open(p) as im:
            assert classify_colour(im) == os.path.basename(p).split("_")[1], p
    assert classify_colour(Image.new("RGB", (64, 64), "white")) is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert classify_colour(Image.fromarray(noise)) is None
