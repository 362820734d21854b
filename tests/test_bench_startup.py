"""`raydiff bench startup`: the plain loop's start-up is measured in a real new process, and the
table puts each side's phases and totals side by side."""

from orchestrator.bench.startup import _median, _plain_once, format_table


def test_plain_loop_start_is_measured_in_a_new_process():
    phases = _plain_once("unet-tiny", 3, 16, 4)
    assert list(phases) == ["interpreter", "import_torch", "build", "first_step"]
    assert all(v >= 0 for v in phases.values())
    assert phases["import_torch"] > 0.05  # a new interpreter really imported torch


def test_table_shows_both_sides_and_their_ratio():
    r = {"plain": _median([{"import_torch": 1.0, "first_step": 1.0}, {"import_torch": 3.0, "first_step": 2.0},
                           {"import_torch": 2.0, "first_step": 9.0}]),
         "raydiff": {"ray": 4.0, "first_step": 8.0}, "raydiff_command_s": 20.0, "repeats": 3, "model": "m", "batch": 8}
    assert r["plain"] == {"import_torch": 2.0, "first_step": 2.0}  # medians per phase
    r["plain_total_s"], r["raydiff_total_s"] = 4.0, 12.0
    table = format_table(r)
    assert "plain: import_torch" in table and "raydiff: ray" in table
    assert "raydiff / plain: 3.0x" in table and "20.0 s" in table
