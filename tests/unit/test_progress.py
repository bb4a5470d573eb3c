"""Progress bars in a log file: a few lines with the real count, not one line per step."""

from rlhfkit.progress import progress


def test_a_log_file_gets_no_line_per_step(capsys):
    bar = progress(range(50), "train")  # under pytest stderr is not a terminal
    for step in bar:
        bar.set_postfix(loss=f"{step:.1f}")
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert len(lines) <= 3, lines  # the first draw, the closing one (and at most one 30-second line)
    assert "50/50" in lines[-1] and "loss=49.0" in lines[-1]


def test_a_disabled_bar_takes_a_postfix(capsys):
    bar = progress(range(3), "train", disable=True)  # every process but rank 0
    for step in bar:
        bar.set_postfix(loss=step)
    assert capsys.readouterr().err == ""
