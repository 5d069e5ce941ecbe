"""Progress off a terminal: a plain line every N steps, statistics read only then."""

from __future__ import annotations

from finegates.training.progress import Progress


def test_plain_lines_every_n_steps_off_a_terminal(capsys):
    reads = []

    def stats() -> dict:
        reads.append(1)
        return {"loss": "0.5"}

    bar = Progress(total=7, initial=0, desc="gates rte", enabled=True, every=3)  # pytest's stderr is no terminal
    for _ in range(7):
        bar.update(stats)
    bar.write("step 7 epoch 1: accuracy 0.5")
    bar.close()
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [f"gates rte: step {s}/7" for s in (3, 6, 7)]  # and the last
    assert all(ln.endswith("loss 0.5") for ln in lines) and "\r" not in out.err
    assert len(reads) == 3
    assert out.out == "step 7 epoch 1: accuracy 0.5\n"


def test_disabled_reads_nothing(capsys):
    bar = Progress(total=4, initial=0, desc="x", enabled=False, every=1)
    for _ in range(4):
        bar.update(lambda: 1 / 0)  # never called
    assert capsys.readouterr().err == ""
