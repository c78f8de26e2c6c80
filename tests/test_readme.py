# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""The Python examples of README.md, run as written.

Every fenced ``python`` block of the README is executed in order in one namespace, as a
reader would paste them into one interpreter; the deconvolved stamps it makes must have the
shape the README states and finite values.
"""

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks(text):
    """The code of each fenced ```python block of a Markdown text."""
    return re.findall(r'^```python\n(.*?)^```', text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.skipif(not README.exists(), reason='README.md is not beside tests/')
def test_readme_python_examples_run(capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, 'README.md has no ```python block'
    namespace = {'__name__': '__readme__'}
    for block in blocks:
        exec(compile(block, str(README), 'exec'), namespace)
    images = namespace['images']
    assert images.shape == namespace['stamps'].shape == (4, 3, 64, 64)
    assert np.all(np.isfinite(images))
    flux = namespace['details']['flux_corrected']
    assert flux.shape == (4, 3) and np.all(np.isfinite(flux))
    # What the block prints: the shape first.
    assert capsys.readouterr().out.startswith('(4, 3, 64, 64)\n')
