from __future__ import annotations

import pytest

from rockpool.preflight import engines_allow


@pytest.mark.parametrize(
    ("engines", "major", "allowed"),
    [
        ("24", 24, True),
        ("24", 22, False),
        ("^22.0.0", 22, True),
        ("^22.0.0", 24, False),
        (">=20", 24, True),
        (">=20", 18, False),
        ("20.x", 20, True),
        (">=18 <21 || 22", 24, True),
    ],
)
def test_engines(engines: str, major: int, allowed: bool) -> None:
    assert engines_allow(engines, major) is allowed
