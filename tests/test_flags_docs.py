# Licensed under a 3-clause BSD style license - see LICENSE.rst
"""docs/flags.rst names every flag of the registry, with its bit and kind."""

import re
from pathlib import Path

import pytest

from psfdeconv.flags import FLAGS, INFORMATIONAL_FLAGS, UNUSABLE_FLAGS

PAGE = Path(__file__).resolve().parent.parent / 'docs' / 'flags.rst'


@pytest.mark.skipif(not PAGE.exists(), reason='docs/ not in this installation')
def test_flags_page_lists_every_flag_with_bit_and_kind():
    rows = {}
    for line in PAGE.read_text().splitlines():
        match = re.match(r'^(\d+)\s+([A-Z_]+)\s+(unusable|informational|qualifying)\s', line)
        if match:
            rows[match.group(2)] = (int(match.group(1)), match.group(3))
    expected = {name: (bit, 'unusable' if name in UNUSABLE_FLAGS else
                       'informational' if name in INFORMATIONAL_FLAGS else 'qualifying')
                for name, bit in FLAGS.items()}
    assert rows == expected
