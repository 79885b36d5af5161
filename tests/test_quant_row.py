"""bench.quant_row: `python -m bench --model llava-next-7b --quant int4` wiring (the 7B export itself is not run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import bench.quant_row as quant_row_module
from bench.__main__ import main
from bench.quant_row import (
    child_command,
    export_command,
    export_record,
    exporter_digest,
    quant_bundle,
    quant_row,
    stale_reason,
)


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
    assert f"--out {out.resolve()}" in flags and "--quant int4" in flags and "--dtype fp16" in flags
    assert "--model llava-next-7b --random-weights" in flags and "--force" not in flags
    assert export_command("llava-next-7b", "int4", out, force=True)[-1] == "--force"
    assert child_command(out, 0.2, 2)[-4:] == ["--budget", "0.2", "--threads", "2"]


def test_an_existing_bundle_is_measured_in_a_child_without_exporting(tiny_bundle, tmp_path, monkeypatch, capsys):
    """The row on an existing folder (the tiny bundle under the int4 name): no export, one child, one table row."""
    (tmp_path / "tiny-int4").symlink_to(tiny_bundle, target_is_directory=True)
    monkeypatch.setattr(quant_row_module, "stale_reason", lambda *a, **k: None)  # tiny is fp32, unquantized
    monkeypatch.setattr(quant_row_module, "export_command", lambda *a, **k: pytest.fail("exported again"))
    row = quant_row("tiny", "int4", tmp_path, budget=0.2, threads=1, log=lambda _m: None)
    assert row["bundle_bytes"] > 0 and row["load_ms"] > 0 and row["ttft_ms"] > 0
    assert 0 < row["load_rss_mb"] <= row["peak_rss_mb"] and row["prefill_tokens"] > 0 and row["s_per_token"] > 0
    assert row["quant"] == "none" and row["accuracy_level"] == 0  # the float tiny bundle's manifest, read back
    table = capsys.readouterr().out
    assert "| tiny-int4 |" in table and "load RSS MiB" in table and "accuracy_level 0" in table


def _sources(root):
    """A stand-in repository root with exporter sources (export/, models/configs/)."""
    for rel in ("export/decoder.py", "models/configs/m.json", "export/README.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def _bundle(folder, quant="int4", dtype="fp16"):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model": {"dtype": dtype}, "quant": {"method": quant}}))
    return folder


def test_a_bundle_is_stale_when_missing_or_of_another_quant_or_dtype(tmp_path):
    root = _sources(tmp_path / "repo")
    assert "no bundle" in stale_reason(tmp_path / "m-int4", "int4", root)
    assert "'int8', the row needs 'int4'" in stale_reason(_bundle(tmp_path / "a", quant="int8"), "int4", root)
    assert "fp32 float parts" in stale_reason(_bundle(tmp_path / "b", dtype="fp32"), "int4", root)


def test_a_recorded_bundle_is_stale_exactly_when_the_exporter_sources_changed(tmp_path):
    root = _sources(tmp_path / "repo")
    bundle = _bundle(tmp_path / "m-int4")
    export_record(bundle).write_text(json.dumps({"exporter_sha256": exporter_digest(root)}))
    assert stale_reason(bundle, "int4", root) is None
    (root / "export/README.md").write_text("docs are not sources")
    assert stale_reason(bundle, "int4", root) is None
    (root / "models/configs/m.json").write_text("{}")
    assert "other exporter sources" in stale_reason(bundle, "int4", root)


def test_a_hand_exported_bundle_is_stale_when_a_source_is_newer_than_its_manifest(tmp_path):
    root = _sources(tmp_path / "repo")
    bundle = _bundle(tmp_path / "m-int4")
    written = (bundle / "manifest.json").stat().st_mtime
    for f in (root / "export/decoder.py", root / "models/configs/m.json"):
        os.utime(f, (written - 60, written - 60))
    assert stale_reason(bundle, "int4", root) is None
    os.utime(root / "export/decoder.py", (written + 60, written + 60))
    assert "older than export/decoder.py" in stale_reason(bundle, "int4", root)


def test_a_record_older_than_the_manifest_is_ignored(tmp_path):
    """A hand re-export after the row's own: the record's digest is no longer the bundle's; the mtimes decide."""
    root = _sources(tmp_path / "repo")
    bundle = _bundle(tmp_path / "m-int4")
    record = export_record(bundle)
    record.write_text(json.dumps({"exporter_sha256": "digest of older sources"}))
    written = (bundle / "manifest.json").stat().st_mtime
    for f in (root / "export/decoder.py", root / "models/configs/m.json"):
        os.utime(f, (written - 60, written - 60))
    os.utime(record, (written + 1, written + 1))
    assert "other exporter sources" in stale_reason(bundle, "int4", root)
    os.utime(record, (written - 30, written - 30))
    assert stale_reason(bundle, "int4", root) is None


def test_a_stale_bundle_is_re_exported_with_force_and_recorded(tmp_path, monkeypatch, capsys):
    bundle = _bundle(tmp_path / "llava-next-7b-int4", quant="int8")
    commands = []

    def fake_export(cmd, **_kw):
        commands.append(cmd)
        (bundle / "manifest.json").write_text(json.dumps({"model": {"dtype": "fp16"}, "quant": {"method": "int4"}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(quant_row_module.subprocess, "run", fake_export)
    row = {"load_ms": 1.0, "load_rss_mb": 2.0, "ttft_ms": 3.0, "prefill_tokens": 4, "s_per_token": 0.5,
           "peak_rss_mb": 6.0, "accuracy_level": 4}  # fmt: skip
    monkeypatch.setattr(quant_row_module, "run_child", lambda *a, **k: dict(row))
    logged = []
    quant_row("llava-next-7b", "int4", tmp_path, budget=0.2, log=logged.append)
    (cmd,) = commands
    assert cmd[-1] == "--force" and "--dtype" in cmd and "'int8', the row needs 'int4'" in logged[0]
    assert json.loads(export_record(bundle).read_text())["exporter_sha256"] == exporter_digest()
    assert stale_reason(bundle, "int4") is None
    assert "accuracy_level 4" in capsys.readouterr().out
