"""Build a Hugging Face LLaVA-NeXT (or LLaVA-1.5) checkpoint folder with seeded random weights, offline.

    python -m models.build tiny --out checkpoints/tiny [--force] [--seed 0] [--dtype float32]
    python -m models.build tiny-llava15 --out checkpoints/tiny-llava15     # LLaVA-1.5 geometry, tiny widths

Any registry name works (`python -m models.build bench`); 7B+ entries are built too, after a warning
about their size. The folder holds what `from_pretrained` needs and nothing else:
config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
processor_config.json (LlavaNextProcessor + LlavaNextImageProcessorPil; LLaVA-1.5: LlavaProcessor +
CLIPImageProcessorPil), `prompt_template.json`
({"template", "add_bos"}) and `build_info.json` (name, seed, dtype, tokenizer kind, config source).

Deterministic: the same name, seed and dtype give byte-identical files. The folder is written
under a temporary name beside `--out` and moved into place at the end; an existing `--out` is
refused unless `--force`. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from models import registry
from models.tokenizer import build_offline_tokenizer, offline_sp_model_path

PROMPT_FILE = "prompt_template.json"
BUILD_INFO_FILE = "build_info.json"
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")  # torch dtype names a checkpoint may be built in
LARGE_PARAMS = 1_000_000_000  # warn above this many parameters

RESAMPLE_BICUBIC = 3


def _total_ram() -> int | None:
    """Physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _stderr(msg: str) -> None:
    print(f"[models.build] {msg}", file=sys.stderr, flush=True)


def count_params(entry: registry.ModelEntry) -> int:
    """Parameter count of `entry`'s model, from a meta-device instance (no memory allocated)."""
    import torch

    from models.arch import model_for

    config = entry.llava_config()
    with torch.device("meta"):
        model = model_for(config)(config)
    return sum(p.numel() for p in model.parameters())


def random_model(config, *, seed: int = 0, dtype: str = "float32"):
    """`LlavaNextForConditionalGeneration(config)` (or `LlavaForConditionalGeneration` for a LLaVA-1.5 config)
    with weights drawn from torch's RNG seeded by `seed`.

    config: a `transformers.LlavaNextConfig` or `LlavaConfig`; its dtype fields are set to `dtype` (the llava-hf
    files say float16 whatever is built), so the saved config says what the weights are.
    """
    import torch

    from models.arch import model_for

    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype must be one of {CHECKPOINT_DTYPES}, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    config.dtype = torch_dtype
    config.text_config.dtype = torch_dtype
    config.vision_config.dtype = torch_dtype
    torch.manual_seed(seed)
    model = model_for(config)._from_config(config, dtype=torch_dtype)
    return model.eval()


def build_model(entry: registry.ModelEntry, *, seed: int = 0, dtype: str = "float32"):
    """`entry`'s model with seeded random weights (see `random_model`)."""
    return random_model(entry.llava_config(), seed=seed, dtype=dtype)


def build_processor(entry: registry.ModelEntry, tokenizer):
    """`LlavaNextProcessor` for `entry`: CLIP-336 anyres preprocessing, the entry's pinpoints, `tokenizer`.
    A LLaVA-1.5 entry gets `LlavaProcessor` with the llava-hf checkpoints' CLIPImageProcessor settings."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    cfg = entry.config
    vision = cfg["vision_config"]
    side = int(vision["image_size"])
    if entry.single_image:
        return build_clip_processor(entry, tokenizer)
    image_processor = LlavaNextImageProcessorPil(
        **clip_processor_settings(side),
        image_grid_pinpoints=[list(p) for p in cfg["image_grid_pinpoints"]],
        do_pad=True,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision["patch_size"]),
        vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
        num_additional_image_tokens=1,
    )


def clip_processor_settings(side: int) -> dict:
    """The image-processor settings LLaVA-NeXT and LLaVA-1.5 checkpoints share: shortest edge `side`, bicubic,
    a `side` x `side` centre crop, rescale to [0, 1], CLIP mean/std, RGB."""
    return dict(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=list(registry.CLIP_MEAN),
        image_std=list(registry.CLIP_STD),
        resample=RESAMPLE_BICUBIC,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
    )


def build_clip_processor(entry: registry.ModelEntry, tokenizer):
    """`LlavaProcessor` of a LLaVA-1.5 entry: CLIPImageProcessor as llava-hf/llava-1.5-*-hf declare it (shortest
    edge resized to 336, bicubic, then a 336x336 centre crop, CLIP mean/std), PIL backend, and `tokenizer`."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vision = entry.config["vision_config"]
    side = int(vision["image_size"])
    image_processor = CLIPImageProcessorPil(**clip_processor_settings(side))
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision["patch_size"]),
        vision_feature_select_strategy=entry.config["vision_feature_select_strategy"],
        num_additional_image_tokens=1,
    )


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def check_tokenizer_json(folder: Path, tokenizer, template: str) -> list[int]:
    """Ids of `template` (prompt filled in) from `folder/tokenizer.json` via `tokenizers`; raise if they
    differ from `tokenizer`'s (both without BOS)."""
    from tokenizers import Tokenizer

    text = template.format(prompt="What is in this picture?")
    fast = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    ref = tokenizer(text, add_special_tokens=False)["input_ids"]
    if fast != ref:
        raise RuntimeError(f"tokenizer.json ids {fast} differ from the transformers tokenizer's {ref}")
    return fast


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; pass --force to replace it")


def _make_readable(folder: Path) -> None:
    """Give `folder` and its files the modes a plain mkdir/open would (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing whatever `out` was."""
    if out.is_dir() and not out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
        return
    if out.exists() or out.is_symlink():
        out.unlink()
    os.replace(tmp, out)


def build_checkpoint(
    name: str,
    out: str | os.PathLike,
    seed: int = 0,
    force: bool = False,
    *,
    dtype: str = "float32",
    log: Callable[[str], None] | None = _stderr,
) -> Path:
    """Write registry model `name` with random weights (seed `seed`) as an HF checkpoint folder at `out`.

    Returns the folder. Raises FileExistsError if `out` exists (and is not an empty folder) without
    `force`, ValueError for an unknown name or dtype, MemoryError when the weights cannot fit in RAM.
    `log` receives progress lines (None: silent).
    """
    say = log or (lambda _msg: None)
    entry = registry.get(name)
    if dtype not in CHECKPOINT_DTYPES:
        raise ValueError(f"dtype must be one of {CHECKPOINT_DTYPES}, got {dtype!r}")
    out = Path(out)
    _refuse_existing(out, force)
    t0 = time.perf_counter()

    n_params = count_params(entry)
    need = n_params * (4 if dtype == "float32" else 2)
    say(f"{name}: {n_params / 1e6:,.1f} M parameters, {dtype}, seed {seed}")
    if n_params > LARGE_PARAMS:
        say(
            f"warning: {name} is large: about {need / 2**30:.1f} GiB in memory and on disk, and random "
            "weights give no meaningful text; --dtype float16 halves it"
        )
    ram = _total_ram()
    if ram is not None and need > ram:
        raise MemoryError(
            f"{name} in {dtype} needs about {need / 2**30:.1f} GiB but this machine has {ram / 2**30:.1f} GiB; "
            "use --dtype float16 or a smaller model (tiny, bench)"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        say("weights")
        model = build_model(entry, seed=seed, dtype=dtype)
        model.save_pretrained(tmp)
        del model

        say(f"tokenizer (offline Mistral sentencepiece from {offline_sp_model_path().name} + <image>)")
        tokenizer = build_offline_tokenizer()
        say("processor")
        processor = build_processor(entry, tokenizer)
        processor.save_pretrained(tmp)
        check_tokenizer_json(tmp, tokenizer, entry.prompt_template)

        _write_json(tmp / PROMPT_FILE, {"template": entry.prompt_template, "add_bos": entry.add_bos})
        _write_json(
            tmp / BUILD_INFO_FILE,
            {
                "model": entry.name,
                "hf_id": entry.hf_id,
                "random_weights": True,
                "seed": seed,
                "dtype": dtype,
                "tokenizer": registry.TOKENIZER_OFFLINE_MISTRAL,
                "config_source": registry.config_source(entry.name),
            },
        )
        _make_readable(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    say(f"wrote {out} ({len(files)} files, {size / 2**20:,.1f} MiB) in {time.perf_counter() - t0:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.build",
        description="Build a LLaVA-NeXT checkpoint folder with seeded random weights (offline).",
    )
    parser.add_argument("name", choices=registry.names(), help="registry model name")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: checkpoints/<name>)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default 0)")
    parser.add_argument("--dtype", choices=CHECKPOINT_DTYPES, default="float32", help="weight dtype (default float32)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else Path("checkpoints") / args.name
    try:
        build_checkpoint(args.name, out, seed=args.seed, force=args.force, dtype=args.dtype)
    except (FileExistsError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
