"""The PyTorch golden path of HiRED: transformers' LlavaNextForConditionalGeneration (or LLaVA-1.5's
LlavaForConditionalGeneration, one partition per image) with visual tokens dropped.

    from export.reference import HiredReference
    ref = HiredReference(model, processor)                     # a loaded LlavaNext + its LlavaNextProcessor
    ref = HiredReference.from_checkpoint("checkpoints/tiny")   # or load both (device="cuda", dtype=torch.float16)
    out = ref.run(image, "What is in this picture?", rate=0.2, alpha=0.5, max_new_tokens=20)
    out.kept_indices, out.order, out.inputs_embeds, out.token_ids, out.timings

What the runtime does with onnxruntime, done here with the torch modules of the checkpoint, so tests can
compare the two stage by stage:

    preprocess   the transformers processor (anyres crops + the base image) -> pixel_values [n, 3, 336, 336]
    vision       the whole HF vision tower with hidden states on (as stock LLaVA-NeXT runs it, the unused
                 last block included); features = hidden_states[vision_feature_layer], CLS dropped [n, 576, Dv]
    scores       forward pre-hooks on the early and late blocks' self_attn catch their (layer-normed) input and
                 recompute only the CLS query row: softmax(q_proj(h)[CLS] . k_proj(h)^T * scale) per head,
                 summed over heads, CLS column dropped -> [n, 576] float32. Independent of export/vision.py.
    select       hired.plan_budget (base early scores) -> select_tokens (late scores) -> pack_tokens
    projector    model.model.multi_modal_projector on the kept tokens only; model.model.image_newline at
                 NEWLINE slots
    embed        prompt template + tokenizer (BOS as the template says), the single <image> replaced by the span
    generate     transformers' own model.generate(inputs_embeds=..., attention_mask=ones, greedy)

At rate 1.0 this is stock LLaVA-NeXT: the same inputs_embeds (to float rounding of the projector on a subset
of rows) and the same tokens as `model.generate(**processor(images=..., text=...))`.
Works on CPU and CUDA, in float32 or float16 (scores are always computed in float32).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hired import NEWLINE, AnyresLayout, BudgetPlan, HiredConfig, pack_tokens, plan_budget, select_tokens

TIMING_KEYS = ("preprocess", "vision", "select", "projector", "prefill", "decode", "ttft", "total")


@dataclass(frozen=True)
class ReferenceOutput:
    """Everything one `HiredReference.run` computed, for stage-by-stage comparison with the runtime.

    pixel_values:   torch [n, 3, S, S], n = 1 + crops (base first), on the model's device and dtype
    early_scores:   float32 [n, 576]: CLS attention of the early block (budget distribution)
    late_scores:    float32 [n, 576]: CLS attention of the late block (token ranking)
    layout, plan:   the hired geometry and budget plan of this image
    kept_indices:   list of n sorted int64 arrays (base first), from hired.select_tokens
    order:          int64 [L]: hired.pack_tokens (image * 576 + token, or NEWLINE)
    inputs_embeds:  torch [1, T, Dt]: prompt before + visual span + prompt after, fed to the LLM
    prompt_ids:     (ids before the image slot, BOS included when the template adds it; ids after)
    prefill_logits: float32 [V]: the logits of the last prompt position
    token_ids:      the new tokens of the greedy generate (EOS included when produced)
    text:           token_ids decoded, special tokens skipped
    timings:        milliseconds per stage (TIMING_KEYS); `prefill` is generate's time to its first token,
                    `ttft` the time from the start of preprocessing to that token
    """

    pixel_values: torch.Tensor
    early_scores: np.ndarray
    late_scores: np.ndarray
    layout: AnyresLayout
    plan: BudgetPlan
    kept_indices: list[np.ndarray]
    order: np.ndarray
    inputs_embeds: torch.Tensor
    prompt_ids: tuple[list[int], list[int]]
    prefill_logits: np.ndarray
    token_ids: list[int]
    text: str
    timings: dict[str, float]

    @property
    def visual_tokens(self) -> int:
        """Length of the visual span fed to the LLM (newline slots included)."""
        return int(self.order.shape[0])


def cls_row_attention(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """CLS query row of a CLIP self-attention's softmax, summed over heads, patch columns only.

    attn:   a CLIPAttention (q_proj, k_proj, num_heads, head_dim, scale)
    hidden: [n, 1 + P, D] its input (already through the block's layer_norm1)
    -> float32 [n, P]; the softmax runs over all 1 + P keys, the CLS column is dropped afterwards.
    """
    n, tokens, _ = hidden.shape
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    q = attn.q_proj(hidden[:, :1]).float().view(n, 1, heads, head_dim).transpose(1, 2)  # [n, H, 1, hd]
    k = attn.k_proj(hidden).float().view(n, tokens, heads, head_dim).transpose(1, 2)  # [n, H, T, hd]
    logits = (q @ k.transpose(-1, -2)) * float(attn.scale)  # [n, H, 1, T]
    return torch.softmax(logits, dim=-1).sum(dim=1)[:, 0, 1:]  # [n, P]


class _ScoreHooks:
    """Forward pre-hooks on two blocks' self_attn that compute their CLS-row scores while the tower runs."""

    def __init__(self, layers: nn.ModuleList, early: int, late: int):
        self.scores: dict[str, torch.Tensor] = {}
        self._handles = [
            layers[early].self_attn.register_forward_pre_hook(self._hook("early"), with_kwargs=True),
            layers[late].self_attn.register_forward_pre_hook(self._hook("late"), with_kwargs=True),
        ]

    def _hook(self, key: str) -> Callable:
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.scores[key] = cls_row_attention(module, hidden)

        return hook

    def __enter__(self) -> _ScoreHooks:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


class _TokenClock:
    """A generate() streamer that only timestamps: the first put is the prompt, each later put one new token."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.sync()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def feature_block_indices(config) -> tuple[int, int, int]:
    """(hidden_states index of the features, early block, late block) for a LlavaNextConfig.

    hidden_states[0] is the embeddings' output and hidden_states[i] the output of block i - 1, so the
    features hidden_states[f] come out of block f - 1 (f >= 0) or num_layers + f (f < 0): that is the late block.
    """
    layer = config.vision_feature_layer
    n = int(config.vision_config.num_hidden_layers)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be a single integer, got {layer!r}")
    index = layer if layer >= 0 else n + 1 + layer
    if not 1 <= index <= n:
        raise ValueError(f"vision_feature_layer {layer} is out of range for a {n}-block vision tower")
    return index, 0, index - 1


class HiredReference:
    """HiRED on a transformers LlavaNextForConditionalGeneration, in torch.

    model:           LlavaNextForConditionalGeneration (put in eval mode; moved when device/dtype are given)
    processor:       its LlavaNextProcessor, or None when `tokenizer` and `image_processor` are given
    prompt_template: text with one "<image>" and one "{prompt}"; default: models.load.load_prompt of the
                     model's checkpoint folder (prompt_template.json), else of the registry entry it matches
    add_bos:         whether BOS goes before the templated prompt (default: as the template source says)
    """

    def __init__(
        self,
        model: nn.Module,
        processor=None,
        *,
        tokenizer=None,
        image_processor=None,
        prompt_template: str | None = None,
        add_bos: bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        if processor is not None:
            tokenizer = tokenizer or processor.tokenizer
            image_processor = image_processor or processor.image_processor
        if tokenizer is None or image_processor is None:
            raise ValueError("HiredReference needs a processor, or both tokenizer= and image_processor=")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = model.config
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' (CLS dropped), got "
                f"{self.config.vision_feature_select_strategy!r}"
            )
        self.feature_index, self.early_layer, self.late_layer = feature_block_indices(self.config)
        template, bos = _prompt_for(model) if prompt_template is None else (prompt_template, True)
        self.prompt_template = template
        self.add_bos = bos if add_bos is None else bool(add_bos)
        self.image_token_id = int(self.config.image_token_id)
        self.image_placeholder = "<image>"
        if self.prompt_template.count(self.image_placeholder) != 1 or "{prompt}" not in self.prompt_template:
            raise ValueError(
                f"prompt template must contain one {self.image_placeholder!r} and one '{{prompt}}', "
                f"got {self.prompt_template!r}"
            )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, **kw
    ) -> HiredReference:
        """Load a LLaVA-NeXT checkpoint folder (models.load) and its processor, on `device` in `dtype`."""
        from models.arch import processor_class
        from models.load import load_model

        model, _, info = load_model(str(path), dtype=dtype)
        processor = processor_class(model.config.model_type).from_pretrained(str(path))
        kw.setdefault("prompt_template", info.prompt_template)
        kw.setdefault("add_bos", info.add_bos)
        return cls(model, processor, device=device, **kw)

    @classmethod
    def random(
        cls,
        name: str,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> HiredReference:
        """The torch twin of `export.stream.export_streaming(name, seed=seed)` bundles: the same seeded weights, built
        directly on `device` in `dtype` (no float32 copy; a 7B model in fp16 needs ~14 GB there), the registry's
        processor numbers and the offline Mistral tokenizer stand-in."""
        from export.meta import RandomWeights, torch_twin
        from models import registry
        from models.build import build_processor
        from models.tokenizer import build_offline_tokenizer

        entry = registry.get(name)
        model = torch_twin(entry.llava_config(), RandomWeights(seed), dtype=dtype, device=device)
        processor = build_processor(entry, build_offline_tokenizer())
        return cls(model, processor, prompt_template=entry.prompt_template, add_bos=entry.add_bos)

    # ---- properties ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- steps (each usable alone) -------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image slot (BOS first when add_bos), like runtime.prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if self.image_placeholder in prompt:
            raise ValueError(f"prompt contains {self.image_placeholder!r}; the image goes in by itself")
        text = self.prompt_template.replace("{prompt}", prompt)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != 1:
            raise ValueError(f"the templated prompt has {len(slots)} image tokens, expected 1: {text!r}")
        if self.add_bos:
            ids = [int(self.bos_token_id), *ids]
            slots[0] += 1
        return ids[: slots[0]], ids[slots[0] + 1 :]

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = self.config.text_config.bos_token_id
        if bos is None:
            raise ValueError("the tokenizer and the text config define no BOS token; pass add_bos=False")
        return int(bos)

    def preprocess(self, image) -> tuple[torch.Tensor, AnyresLayout]:
        """image: PIL image or HxWx3 uint8 array -> (pixel_values [n, 3, S, S] on device/dtype, layout)."""
        batch = self.image_processor(images=[image], return_tensors="pt")
        pins = getattr(self.config, "image_grid_pinpoints", None) or ()  # none: LLaVA-1.5, one partition
        if "image_sizes" in batch:
            height, width = (int(v) for v in batch["image_sizes"][0])
        else:
            height, width = np.asarray(image).shape[:2]
        vc = self.config.vision_config
        layout = AnyresLayout.for_image(
            width=width,
            height=height,
            grid_pinpoints=pins,
            crop_size=int(vc.image_size),
            patch_size=int(vc.patch_size),
        )
        pixels = batch["pixel_values"][: layout.n_images] if layout.single else batch["pixel_values"][0][: layout.n_images]
        if pixels.shape[0] != layout.n_images:
            raise ValueError(
                f"the processor gave {pixels.shape[0]} images, the layout expects {layout.n_images}"
            )
        return pixels.to(device=self.device, dtype=self.dtype), layout

    @torch.no_grad()
    def vision(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """pixel_values [n, 3, S, S] -> (features [n, P, Dv], early float32 [n, P], late float32 [n, P])."""
        tower = self.model.model.vision_tower
        with _ScoreHooks(tower.encoder.layers, self.early_layer, self.late_layer) as hooks:
            out = tower(pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_index][:, 1:]
        early = hooks.scores["early"].cpu().numpy()
        late = hooks.scores["late"].cpu().numpy()
        return features, early, late

    @torch.no_grad()
    def project(self, features: torch.Tensor, order: np.ndarray) -> torch.Tensor:
        """features [n, P, Dv] + packed order [L] -> visual span [L, Dt] (projector rows, image_newline slots)."""
        flat = features.reshape(-1, features.shape[-1])
        is_token = torch.from_numpy(order != NEWLINE).to(self.device)
        index = torch.from_numpy(order[order != NEWLINE]).to(self.device)
        projected = self.model.model.multi_modal_projector(flat[index])
        newline = getattr(self.model.model, "image_newline", None)  # LLaVA-1.5 has none (and no NEWLINE slot)
        newline = projected.new_zeros(projected.shape[-1]) if newline is None else newline.to(projected.dtype)
        visual = newline.expand(order.shape[0], -1).clone()
        visual[is_token] = projected
        return visual

    @torch.no_grad()
    def embed(self, visual: torch.Tensor, ids_before: list[int], ids_after: list[int]) -> torch.Tensor:
        """[1, T, Dt]: embeddings of ids_before, the visual span [L, Dt], embeddings of ids_after."""
        table = self.model.get_input_embeddings()
        before = table(torch.tensor(ids_before, dtype=torch.long, device=self.device))
        after = table(torch.tensor(ids_after, dtype=torch.long, device=self.device))
        return torch.cat([before, visual.to(before.dtype), after])[None]

    # ---- the whole request ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(
        self,
        image,
        prompt: str,
        *,
        rate: float = 0.2,
        alpha: float = 0.5,
        distribution: str = "spatial",
        newlines: str = "none",
        max_new_tokens: int = 20,
        min_new_tokens: int | None = None,
    ) -> ReferenceOutput:
        """One greedy request; see ReferenceOutput. rate 1.0 is the stock model whatever the other options.

        `min_new_tokens` suppresses EOS until that many tokens (benchmarks timing a fixed decode length)."""
        cfg = HiredConfig(rate=rate, alpha=alpha, distribution=distribution, newlines=newlines)
        ids_before, ids_after = self.prompt_ids(prompt)
        marks: dict[str, float] = {}
        self._sync()
        t_start = time.perf_counter()
        pixel_values, layout = self.preprocess(image)
        _mark(marks, "preprocess", t_start, self._sync)

        features, early, late = self.vision(pixel_values)
        _mark(marks, "vision", t_start, self._sync)

        plan = plan_budget(layout, early[0], cfg)
        keep = select_tokens(late, plan, layout)
        order = pack_tokens(keep, layout, cfg)
        _mark(marks, "select", t_start, self._sync)

        visual = self.project(features, order)
        inputs_embeds = self.embed(visual, ids_before, ids_after)
        _mark(marks, "projector", t_start, self._sync)

        clock = _TokenClock(self._sync)
        out = self.model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=self.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            streamer=clock,
        )
        _mark(marks, "end", t_start, self._sync)
        marks["prefill"] = _ms(clock.times[0] - t_start) if clock.times else marks["end"]  # the first token
        token_ids = new_tokens(out.sequences[0], max_new_tokens)
        return ReferenceOutput(
            pixel_values=pixel_values,
            early_scores=early,
            late_scores=late,
            layout=layout,
            plan=plan,
            kept_indices=keep,
            order=order,
            inputs_embeds=inputs_embeds,
            prompt_ids=(ids_before, ids_after),
            prefill_logits=out.logits[0][0].float().cpu().numpy(),
            token_ids=token_ids,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            timings=_stage_times(marks),
        )


def new_tokens(sequence: torch.Tensor, max_new_tokens: int) -> list[int]:
    """The generated ids of a generate(inputs_embeds=...) sequence (transformers 5.x returns only those)."""
    ids = [int(t) for t in sequence.tolist()]
    if len(ids) > max_new_tokens:
        raise RuntimeError(
            f"generate returned {len(ids)} ids for max_new_tokens={max_new_tokens}; this transformers version "
            "prepends something to inputs_embeds generations, which HiredReference does not handle"
        )
    return ids


def _ms(seconds: float) -> float:
    """Seconds as milliseconds rounded to the microsecond (every reported time derives from such marks)."""
    return round(seconds * 1000, 3)


def _mark(marks: dict[str, float], key: str, since: float, sync: Callable[[], None]) -> None:
    sync()
    marks[key] = _ms(time.perf_counter() - since)


def _stage_times(marks: dict[str, float]) -> dict[str, float]:
    """TIMING_KEYS from the clock marks (ms since the request began, each at its stage's end): differences of
    rounded marks, so stages add up exactly (total == ttft + decode) rather than each being rounded on its own."""
    stages, before = {}, 0.0
    for key in ("preprocess", "vision", "select", "projector", "prefill"):
        stages[key], before = round(marks[key] - before, 3), marks[key]
    return {**stages, "decode": round(marks["end"] - marks["prefill"], 3), "ttft": marks["prefill"],
            "total": marks["end"]}  # fmt: skip


def _prompt_for(model: nn.Module) -> tuple[str, bool]:
    """(template, add_bos) of the model's checkpoint folder, else of the registry entry its config matches."""
    from models import registry
    from models.load import load_prompt

    folder = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if folder and Path(folder).is_dir():
        return load_prompt(folder)
    entry = registry.match_config(model.config.to_dict())
    if entry is None:
        raise ValueError(
            "cannot tell this model's prompt template (no checkpoint folder, no registry match); "
            "pass prompt_template= and add_bos="
        )
    return entry.prompt_template, entry.add_bos


__all__ = ["TIMING_KEYS", "HiredReference", "ReferenceOutput", "cls_row_attention", "feature_block_indices"]
