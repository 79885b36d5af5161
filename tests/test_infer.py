"""runtime.infer, the command line: output paths checked before any model runs, one line and exit 2 for every
bad input, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.infer import main
from tests.helpers import scene

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is in this picture?"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("infer") / "img.png"
    scene(300, 200).save(path)
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "flag, make, message",
    [
        ("--dump", lambda d: (d / "taken.npy").write_bytes(b"x") and d / "taken.npy", "a file of that name exists"),
        ("--dump", lambda d: (d / "f").write_bytes(b"x") and d / "f" / "sub", "not a writable folder"),
        ("--show-kept", lambda d: d / "no" / "such" / "kept.png", "does not exist"),
        ("--show-kept", lambda d: d / "kept.xyz", "unknown picture type '.xyz'"),
        ("--show-kept", lambda d: d / "kept", "unknown picture type '(no extension)'"),
        ("--show-kept", lambda d: (d / "pic.png").mkdir() or d / "pic.png", "is a folder"),
    ],
)
def test_bad_output_paths_fail_first_in_one_line(tiny_bundle, tmp_path, capsys, flag, make, message):
    target = make(tmp_path)
    # the image does not exist either: the output path must be refused before anything else is read
    code, out, err = cli(capsys, "--artifacts", tiny_bundle, "--image", tmp_path / "missing.png", "--prompt", PROMPT,
                         flag, target)  # fmt: skip
    assert code == 2 and message in err and flag in err, err
    assert err.count("\n") == 1 and out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", str(10**30)], "max_new_tokens"),
        (["--max-new-tokens", "2", "--min-new-tokens", "5"], "min_new_tokens"),
        (["--seed", "-1"], "seed"),
        (["--temperature", "nan"], "temperature"),
        (["--top-p", "2"], "top_p"),
        (["--budget", "inf"], "budget"),
        (["--max-pixels", "0"], "max_pixels"),
        (["--prompt", "\u200b\x00"], "empty"),
        (["--image", "/dev/null"], "/dev/null"),
        (["--image", "."], "."),
        (["--artifacts", "README.md"], "README.md"),
    ],
)
def test_no_input_gives_a_traceback(tiny_bundle, image, capsys, args, message):
    base = {"--artifacts": str(tiny_bundle), "--image": str(image), "--prompt": PROMPT, "--max-new-tokens": "2"}
    pairs = dict(zip(args[::2], args[1::2]))
    argv = [x for kv in {**base, **pairs}.items() for x in kv]
    code, _, err = cli(capsys, *argv)
    assert code == 2 and message in err and err.startswith("error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_dump_into_an_existing_folder_keeps_the_file_names(tiny_bundle, image, tmp_path, capsys):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "other.txt").write_text("kept")
    code, _, err = cli(capsys, "--artifacts", tiny_bundle, "--image", image, "--prompt", PROMPT, "--max-new-tokens", 2,
                       "--dump", dump, "--show-kept", tmp_path / "kept.JPG")  # fmt: skip
    assert code == 0, err
    names = {"pixel_values.npy", "early_scores.npy", "late_scores.npy", "kept_indices.json", "inputs_embeds.npy",
             "prefill_logits.npy", "other.txt"}  # fmt: skip
    assert {f.name for f in dump.iterdir()} == names
    assert (tmp_path / "kept.JPG").read_bytes()[:2] == b"\xff\xd8"  # JPEG, by the extension


@pytest.mark.parametrize("threads, want", [(["--threads", "1"], 1), ([], 0)])  # 0: onnxruntime's default
def test_threads_reach_every_session(tiny_bundle, image, capsys, monkeypatch, threads, want):
    from runtime.session import OrtSession

    seen = {}
    original = OrtSession.from_manifest.__func__

    def recording(cls, manifest, name, *args, **kwargs):
        s = original(cls, manifest, name, *args, **kwargs)
        seen[name] = s.session.get_session_options().intra_op_num_threads
        return s

    monkeypatch.setattr(OrtSession, "from_manifest", classmethod(recording))
    code, _, err = cli(capsys, "--artifacts", tiny_bundle, "--image", image, "--prompt", PROMPT, "--max-new-tokens", 1,
                       *threads)  # fmt: skip
    assert code == 0, err
    assert seen == {"vision": want, "projector": want, "decoder": want}


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_threads_below_one_are_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--artifacts", "x", "--image", "x.png", "--prompt", PROMPT, "--threads", value])
    assert exit_.value.code == 2 and "--threads: must be an integer >= 1" in capsys.readouterr().err


def test_help_says_the_thread_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "one per physical core" in " ".join(capsys.readouterr().out.split())


def test_the_process_exits_2_with_one_line(tiny_bundle, tmp_path):
    (tmp_path / "taken").write_text("x")
    p = subprocess.run(
        [sys.executable, "-m", "runtime.infer", "--artifacts", str(tiny_bundle), "--image", "x.png", "--prompt", PROMPT,
         "--dump", str(tmp_path / "taken")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--dump" in p.stderr, p.stderr
