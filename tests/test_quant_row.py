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
    default_block_size,
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
    assert kw["budget"] == 0.2 and kw["threads"] == 2 and kw["force_export"] is False and kw["block_size"] is None
    assert main([*args, "--block-size", "128"]) == 0
    assert calls[-1][1]["block_size"] == 128


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--block-size", "128"], "--block-size is for --quant"),
     (["--quant", "int4", "--block-size", "48"], "power of 2 >= 16"),
     (["--quant", "int4", "--block-size", "8"], "power of 2 >= 16")],
)  # fmt: skip
def test_a_block_size_without_quant_or_not_a_power_of_2_is_refused(flags, says, capsys, monkeypatch):
    monkeypatch.setattr(quant_row_module, "quant_row", lambda *a, **k: pytest.fail("the row ran"))
    with pytest.raises(SystemExit) as stop:
        main(flags)
    assert stop.value.code == 2 and says in capsys.readouterr().err


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
    assert f"--block-size {default_block_size()}" in flags  # the default said explicitly
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


def _bundle(folder, quant="int4", dtype="fp16", block_size=None):
    folder.mkdir(parents=True)
    spec = {"method": quant, "block_size": default_block_size() if block_size is None else block_size}
    (folder / "manifest.json").write_text(json.dumps({"model": {"dtype": dtype}, "quant": spec}))
    return folder


def test_the_block_size_names_the_folder_unless_it_is_the_exporters_default(tmp_path, monkeypatch):
    from export.defaults import DEFAULT_BLOCK_SIZE

    assert default_block_size() == DEFAULT_BLOCK_SIZE
    for block_size in (None, DEFAULT_BLOCK_SIZE):
        assert quant_bundle("llava-next-7b", "int4", tmp_path, block_size) == tmp_path / "llava-next-7b-int4"
    out = quant_bundle("llava-next-7b", "int4", tmp_path, 128)
    assert out == tmp_path / "llava-next-7b-int4-b128"
    cmd = export_command("llava-next-7b", "int4", out, force=False, block_size=128)
    assert cmd[cmd.index("--block-size") + 1] == "128" and cmd[cmd.index("--out") + 1] == str(out.resolve())
    monkeypatch.setattr("export.defaults.DEFAULT_BLOCK_SIZE", 128)  # read from the exporter, not a copy of it
    assert quant_bundle("llava-next-7b", "int4", tmp_path, 128) == tmp_path / "llava-next-7b-int4"
    assert quant_bundle("llava-next-7b", "int4", tmp_path, 32) == tmp_path / "llava-next-7b-int4-b32"


def test_a_bundle_of_another_block_size_is_stale(tmp_path):
    root = _sources(tmp_path / "repo")
    default, b128 = _bundle(tmp_path / "m-int4"), _bundle(tmp_path / "m-int4-b128", block_size=128)
    written = min((b / "manifest.json").stat().st_mtime for b in (default, b128))
    for f in (root / "export/decoder.py", root / "models/configs/m.json"):
        os.utime(f, (written - 60, written - 60))
    assert stale_reason(default, "int4", root) is None
    assert stale_reason(b128, "int4", root, block_size=128) is None
    assert f"block size 128, the row needs {default_block_size()}" in stale_reason(b128, "int4", root)
    assert "block size 32, the row needs 128" in stale_reason(default, "int4", root, block_size=128)
    legacy = tmp_path / "old-int4"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(json.dumps({"model": {"dtype": "fp16"}, "quant": {"method": "int4"}}))
    assert "block size None" in stale_reason(legacy, "int4", root)


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
        quant = {"method": "int4", "block_size": default_block_size()}
        (bundle / "manifest.json").write_text(json.dumps({"model": {"dtype": "fp16"}, "quant": quant}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(quant_row_module.subprocess, "run", fake_export)
    row = {"load_ms": 1.0, "load_rss_mb": 2.0, "ttft_ms": 3.0, "prefill_tokens": 4, "s_per_token": 0.5,
           "peak_rss_mb": 6.0, "block_size": 32, "accuracy_level": 4}  # fmt: skip
    monkeypatch.setattr(quant_row_module, "run_child", lambda *a, **k: dict(row))
    logged = []
    quant_row("llava-next-7b", "int4", tmp_path, budget=0.2, log=logged.append)
    (cmd,) = commands
    assert cmd[-1] == "--force" and "--dtype" in cmd and "'int8', the row needs 'int4'" in logged[0]
    assert json.loads(export_record(bundle).read_text())["exporter_sha256"] == exporter_digest()
    assert stale_reason(bundle, "int4") is None
    assert "block 32, accuracy_level 4" in capsys.readouterr().out


def test_a_block_128_row_exports_its_own_folder_with_its_block_size(tmp_path, monkeypatch, capsys):
    """--block-size 128 beside an up-to-date default bundle: the -b128 folder is exported, the default one untouched."""
    default = _bundle(tmp_path / "llava-next-7b-int4")
    bundle = tmp_path / "llava-next-7b-int4-b128"
    commands = []

    def fake_export(cmd, **_kw):
        commands.append(cmd)
        bundle.mkdir()
        quant = {"method": "int4", "block_size": int(cmd[cmd.index("--block-size") + 1])}
        (bundle / "manifest.json").write_text(json.dumps({"model": {"dtype": "fp16"}, "quant": quant}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(quant_row_module.subprocess, "run", fake_export)
    children = []
    row = {"load_ms": 1.0, "load_rss_mb": 2.0, "ttft_ms": 3.0, "prefill_tokens": 4, "s_per_token": 0.5,
           "peak_rss_mb": 6.0, "block_size": 128, "accuracy_level": 4}  # fmt: skip
    monkeypatch.setattr(quant_row_module, "run_child", lambda cmd, **k: children.append(cmd) or dict(row))
    quant_row("llava-next-7b", "int4", tmp_path, budget=0.2, block_size=128, log=lambda _m: None)
    (cmd,) = commands
    assert cmd[cmd.index("--out") + 1] == str(bundle.resolve()) and "--force" not in cmd
    assert children[0][children[0].index("--bundle") + 1] == str(bundle.resolve())
    assert stale_reason(bundle, "int4", block_size=128) is None and json.loads(export_record(bundle).read_text())
    assert not export_record(default).exists()
    out = capsys.readouterr().out
    assert "| llava-next-7b-int4-b128 |" in out and "block 128" in out
    quant_row("llava-next-7b", "int4", tmp_path, budget=0.2, block_size=128, log=lambda _m: None)
    assert len(commands) == 1 and len(children) == 2  # up to date now: measured again, not re-exported
