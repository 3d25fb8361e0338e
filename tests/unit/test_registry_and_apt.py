from __future__ import annotations

import pytest

from rockpool.build.preflight import engines_allow


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


def test_apt_download_lines_drive_a_bar() -> None:
    from pathlib import Path
    from typing import Any, cast

    from rockpool.build.bootstrap import AptDownloadProgress

    class Recorder:
        def __init__(self) -> None:
            self.updates: list[float] = []
            self.total = 0.0

        def task(self, description: str, total: float) -> Any:
            self.total = total
            recorder = self

            class T:
                def update(self, done: float) -> None:
                    recorder.updates.append(done)

                def done(self) -> None:
                    pass

            return T()

        def status(self, text: str) -> None:
            pass

    recorder = Recorder()
    ctx = cast(Any, type("Ctx", (), {"reporter": recorder, "work": Path("/")})())
    progress = AptDownloadProgress(ctx)
    for line in (
        "Get:1 http://deb.debian.org/debian trixie InRelease [140 kB]",
        "Need to get 25.4 MB of archives.",
        "Get:1 http://deb.debian.org/debian trixie/main amd64 gcc-base amd64 14.2.0 [49.4 kB]",
        "Get:2 http://deb.debian.org/debian trixie/main amd64 libc6 amd64 2.41-12 [2,850 kB]",
    ):
        progress(line)
    assert recorder.total == 25.4e6
    assert recorder.updates == [49.4e3, 49.4e3 + 2850e3]
