"""bench.quant_row: `python -m bench --model llava-next-7b --quant int4` wiring (the 7B export itself is not run)."""

from __future__ import annotations

import sys

import pytest

import bench.quant_row as quant_row_module
from bench.__main__ import main
from bench.quant_row import child_command, export_command, quant_bundle, quant_row


def test_bench_quant_runs_only_the_quantized_row_at_budget_0_2(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(quant_row_module, "quant_row", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr("bench.__main__.run", lambda _args: pytest.fail("the full tables ran"))
    args = ["--model", "llava-next-7b", "--quant", "int4", "--artifacts", str(tmp_path), "--threads", "2"]
    assert main(args) == 0
    (pos, kw), = calls
    assert pos == ("llava-next-7b", "int4", tmp_path)
    assert kw["budget"] == 0.2 and kw["threads"] == 2 and kw["force_export"] is False


def test_an_unknown_quant_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--quant", "int3"])
    assert stop.value.code == 2 and "'none', 'int8', 'int4'" in capsys.readouterr().err


def test_the_7b_int4_bundle_is_exported_with_random_weights_and_quant(tmp_path):
    out = quant_bundle("llava-next-7b", "int4", tmp_path)
    assert out == tmp_path / "llava-next-7b-int4"
    cmd = export_command("llava-next-7b", "int4", out, force=False)
    assert cmd[:3] == [sys.executable, "-m", "export"]
    flags = " ".join(cmd[3:])
    assert f"--out {out.resolve()}" in flags and "--quant int4" in flags
    assert "--model llava-next-7b --random-weights" in flags and "--force" not in flags
    assert export_command("llava-next-7b", "int4", out, force=True)[-1] == "--force"
    assert child_command(out, 0.2, 2)[-4:] == ["--budget", "0.2", "--threads", "2"]


def test_an_existing_bundle_is_measured_in_a_child_without_exporting(tiny_bundle, tmp_path, monkeypatch, capsys):
    """The row on an existing folder (the tiny bundle under the int4 name): no export, one child, one table row."""
    (tmp_path / "tiny-int4").symlink_to(tiny_bundle, target_is_directory=True)
    monkeypatch.setattr(quant_row_module, "export_command", lambda *a, **k: pytest.fail("exported again"))
    row = quant_row("tiny", "int4", tmp_path, budget=0.2, threads=1, log=lambda _m: None)
    assert row["bundle_bytes"] > 0 and row["load_ms"] > 0 and row["ttft_ms"] > 0
    assert 0 < row["load_rss_mb"] <= row["peak_rss_mb"] and row["prefill_tokens"] > 0
    table = capsys.readouterr().out
    assert "| tiny-int4 |" in table and "load RSS MiB" in table
