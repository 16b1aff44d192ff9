"""What a running generation stage shows (generation/progress.py): off a terminal one line a minute,
on a terminal a bar, nothing when quiet."""
import io

from generation.progress import StageProgress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_off_a_terminal_one_line_a_minute(monkeypatch):
    monkeypatch.delenv("BFT_QUIET", raising=False)
    out, clock = io.StringIO(), Clock()
    p = StageProgress("rewrite", 100, stream=out, clock=clock)
    p.skip(10)                                  # reused rows count as done at once
    for i in range(30):
        clock.t += 3                            # 90 s: one line at 60 s
        p.answer(50, error=i == 0, refused=i == 1)
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("generate rewrite: 30/100 rows (30.0%), 0.3 req/s, 17 tok/s, 1 transient errors, "
                               "1 refused, elapsed 1m00s, ETA 3m30s")


def test_quiet_shows_nothing(monkeypatch):
    monkeypatch.setenv("BFT_QUIET", "1")
    out, clock = io.StringIO(), Clock()
    p = StageProgress("score", 10, stream=out, clock=clock)
    for _ in range(10):
        clock.t += 100
        p.answer(1, error=False, refused=False)
    p.close()
    assert out.getvalue() == ""


def test_on_a_terminal_a_bar(monkeypatch):
    monkeypatch.delenv("BFT_QUIET", raising=False)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = StageProgress("score", 4, stream=out)
    for _ in range(4):
        p.answer(3, error=False, refused=False)
    p.close()
    assert "generate score" in out.getvalue() and "4/4" in out.getvalue()
