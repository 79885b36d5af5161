"""Check an exported bundle against PyTorch on the same inputs; fail loudly past tolerance.

    python -m export --model checkpoints/tiny --out artifacts/tiny --verify     # exit 1 on a mismatch
    from export.verify import verify_bundle
    report = verify_bundle("artifacts/tiny", model)    # raises VerificationError; report.lines() for a log

Checks (onnxruntime CPU vs the torch model that was exported):
  vision     a deterministic image-like pixel tensor of 1 and of 5 crops: features vs HF
             hidden_states[feature_layer] (CLS dropped); early/late scores vs the full softmax(QK^T) matrix
             rebuilt from hooked q_proj/k_proj outputs of the HF forward, CLS row, patch columns, head sum.
  projector  123 randomly picked feature rows of the 5-crop run.
  decoder    a prompt-length inputs_embeds (template tokens around the projected image rows): greedy ORT loop
             with the KV cache (empty past at prefill) vs `model.generate(inputs_embeds=...)`, 20 steps;
             tokens must be equal, and each step's logits close while the tokens agree.
Errors are relative: max|ort - torch| / max|torch|. fp32 bundles: 1e-4 everywhere, tokens equal.
fp16 bundles use looser tolerances (2e-2 for vision/projector, 5e-2 for logits) and only need the first
greedy token to agree, because fp16 rounding differs between ORT and torch kernels and flips near-ties
of random-weight models later on; their token agreement is still printed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from export.errors import VerificationError
from runtime.manifest import Manifest

TOLERANCES = {
    "fp32": {"vision": 1e-4, "projector": 1e-4, "logits": 1e-4, "token_steps": None},
    "fp16": {"vision": 2e-2, "projector": 2e-2, "logits": 5e-2, "token_steps": 1},
}
VERIFY_PROMPT = "Describe the picture in detail."
KEPT_TOKENS = 123


@dataclass(frozen=True)
class Check:
    """One comparison: `rel` = max|ort - torch| / max|torch| must be <= `tol`."""

    name: str
    max_abs: float
    rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.rel) and self.rel <= self.tol

    def line(self) -> str:
        mark = "ok" if self.ok else "FAIL"
        return f"{self.name}: max abs {self.max_abs:.3g}, rel {self.rel:.3g} (tol {self.tol:g}) {mark}"


@dataclass
class VerifyReport:
    """All checks of one bundle, plus the greedy tokens of both sides."""

    dtype: str
    checks: list[Check] = field(default_factory=list)
    ort_tokens: list[int] = field(default_factory=list)
    torch_tokens: list[int] = field(default_factory=list)
    token_steps_required: int | None = None  # None: all steps must agree

    @property
    def tokens_agree(self) -> int:
        """Leading greedy steps on which ORT and torch chose the same token."""
        n = 0
        for a, b in zip(self.ort_tokens, self.torch_tokens):
            if a != b:
                break
            n += 1
        return n

    @property
    def tokens_ok(self) -> bool:
        if self.token_steps_required is None:
            return self.ort_tokens == self.torch_tokens and len(self.ort_tokens) > 0
        return self.tokens_agree >= min(self.token_steps_required, len(self.torch_tokens))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and self.tokens_ok

    def lines(self) -> list[str]:
        out = [c.line() for c in self.checks]
        need = "all" if self.token_steps_required is None else f">= {self.token_steps_required}"
        out.append(
            f"decoder greedy tokens: {self.tokens_agree}/{len(self.torch_tokens)} steps agree "
            f"(need {need}) {'ok' if self.tokens_ok else 'FAIL'}"
        )
        if not self.tokens_ok:
            out.append(f"  ort   {self.ort_tokens}")
            out.append(f"  torch {self.torch_tokens}")
        return out

    def failures(self) -> list[str]:
        bad = [c.line() for c in self.checks if not c.ok]
        if not self.tokens_ok:
            bad.append(f"greedy tokens differ after {self.tokens_agree} of {len(self.torch_tokens)} steps")
        return bad


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: float) -> Check:
    """Check of `got` against `ref` (same shape) with the relative error max|got - ref| / max|ref|."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Check(f"{name} (shape {got.shape} vs {ref.shape})", math.inf, math.inf, tol)
    max_abs = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if not np.all(np.isfinite(got)):
        rel = math.inf
    return Check(name, max_abs, rel, tol)


# ---------------------------------------------------------------------------------------------- inputs
def image_like_pixels(crops: int, size: int, mean, std, dtype=np.float32) -> np.ndarray:
    """[crops, 3, size, size]: smooth colour gradients and stripes, different per crop, normalised like CLIP."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.empty((crops, 3, size, size), dtype=np.float64)
    for c in range(crops):
        phase = 0.37 * c
        out[c, 0] = 0.5 + 0.5 * np.sin(2 * np.pi * (1.5 * x + phase)) * np.cos(2 * np.pi * y)
        out[c, 1] = (x * (1 - y) + 0.25 * np.sin(9 * np.pi * (x + y) + phase) + 0.25) / 1.5
        out[c, 2] = np.clip(((x - 0.5) ** 2 + (y - 0.4 - 0.1 * c) ** 2) * 2.0, 0, 1)
    out = np.round(out * 255) / 255  # what an 8-bit image gives
    mean = np.asarray(mean, dtype=np.float64)[None, :, None, None]
    std = np.asarray(std, dtype=np.float64)[None, :, None, None]
    return ((out - mean) / std).astype(dtype)


def torch_vision_reference(model, pixels: torch.Tensor, feature_layer: int, layers: tuple[int, int]):
    """(features [c, P, Dv], early [c, P], late [c, P]) from the HF vision tower forward, float32.

    Scores come from the full attention matrix softmax(Q K^T / sqrt(hd)) of hooked q_proj/k_proj outputs
    (the way the official HiRED code reads them): CLS query row, patch columns, summed over heads.
    """
    tower = model.model.vision_tower
    heads = int(tower.config.num_attention_heads)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for layer in layers:
        attn = tower.encoder.layers[layer].self_attn
        for proj in ("q_proj", "k_proj"):
            def hook(_m, _i, out, key=(layer, proj)):
                captured[key] = out.detach()

            hooks.append(getattr(attn, proj).register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = tower(pixels, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    features = out.hidden_states[feature_layer][:, 1:].float()
    scores = []
    for layer in layers:
        q, k = captured[(layer, "q_proj")].float(), captured[(layer, "k_proj")].float()
        c, t, d = q.shape
        hd = d // heads
        q = q.reshape(c, t, heads, hd).transpose(1, 2)
        k = k.reshape(c, t, heads, hd).transpose(1, 2)
        full = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5, dim=-1)  # [c, H, T, T]
        scores.append(full[:, :, 0, 1:].sum(dim=1))
    return features.numpy(), scores[0].numpy(), scores[1].numpy()


def prompt_embeds(manifest: Manifest, embed: np.ndarray, image_rows: np.ndarray) -> np.ndarray:
    """[L, Dt]: the template's tokens (BOS first when the manifest says so) around `image_rows` [k, Dt]."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(manifest.path("tokenizer")))
    before, after = manifest.prompt.template.format(prompt=VERIFY_PROMPT).split(manifest.prompt.image_placeholder)
    ids_before = tok.encode(before, add_special_tokens=False).ids
    ids_after = tok.encode(after, add_special_tokens=False).ids
    if manifest.prompt.add_bos:
        ids_before = [manifest.tokens.bos, *ids_before]
    return np.concatenate([embed[ids_before], image_rows.astype(embed.dtype), embed[ids_after]], axis=0)


# ---------------------------------------------------------------------------------------------- ORT
def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    threads = os.cpu_count() or 1
    opts.intra_op_num_threads = min(threads, 4)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def ort_greedy(session, manifest: Manifest, embed: np.ndarray, embeds: np.ndarray, steps: int):
    """Greedy decode in ORT: prefill with an empty past, then one token per call. -> (tokens, logits [n, V])."""
    spec, text = manifest.graphs["decoder"], manifest.text
    kv_dtype = embed.dtype
    past = [np.zeros((1, text.num_kv_heads, 0, text.head_dim), dtype=kv_dtype) for _ in range(2 * text.num_layers)]
    names = [spec.outputs["logits"]] + [
        spec.outputs[k].format(i=i) for i in range(text.num_layers) for k in ("present_key", "present_value")
    ]
    past_names = [spec.inputs[k].format(i=i) for i in range(text.num_layers) for k in ("past_key", "past_value")]
    tokens, logits = [], []
    chunk, start = embeds, 0
    for _ in range(steps):
        s = chunk.shape[0]
        feeds = {
            spec.inputs["inputs_embeds"]: chunk[None].astype(kv_dtype),
            spec.inputs["attention_mask"]: np.ones((1, start + s), dtype=np.int64),
            spec.inputs["position_ids"]: np.arange(start, start + s, dtype=np.int64)[None],
        }
        feeds.update(zip(past_names, past))
        outs = session.run(names, feeds)
        step_logits = outs[0].reshape(-1).astype(np.float32)
        token = int(np.argmax(step_logits))
        tokens.append(token)
        logits.append(step_logits)
        past = outs[1:]
        start += s
        chunk = embed[token][None]
        if token == manifest.tokens.eos:
            break
    return tokens, np.stack(logits)


def torch_greedy(model, embeds: np.ndarray, steps: int, eos: int):
    """`model.generate(inputs_embeds=...)`, greedy, up to `steps` new tokens -> (tokens, raw logits [n, V])."""
    dtype = next(model.parameters()).dtype
    x = torch.from_numpy(np.ascontiguousarray(embeds)).to(dtype)[None]
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=x,
            attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,  # neutral processors, whatever the checkpoint's generation_config says
            no_repeat_ngram_size=0,
            min_length=0,
            eos_token_id=eos,
            pad_token_id=eos,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0].tolist()[-len(out.logits):]
    logits = torch.stack([step[0] for step in out.logits]).float().numpy()
    return tokens, logits


# ---------------------------------------------------------------------------------------------- main
def verify_bundle(
    folder: str | os.PathLike,
    model,
    *,
    steps: int = 20,
    seed: int = 0,
    log=None,
    raise_on_failure: bool = True,
) -> VerifyReport:
    """Run every graph of the bundle at `folder` in ORT and `model` (the torch model it came from) on the
    same inputs; return the report, raising VerificationError past tolerance (unless told not to)."""
    say = log or (lambda _msg: None)
    manifest = Manifest.from_file(folder)
    dtype = manifest.model.dtype
    tol = TOLERANCES[dtype]
    report = VerifyReport(dtype=dtype, token_steps_required=tol["token_steps"])
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    if dtype == "fp16":
        say(
            f"fp16 bundle: looser tolerances (vision/projector {tol['vision']:g}, logits {tol['logits']:g}); "
            f"greedy tokens need to agree on the first {tol['token_steps']} step(s) only"
        )
    ip, vs = manifest.image_processor, manifest.vision
    model.eval()

    vision = ort_session(manifest.path("vision"))
    vnames = manifest.graphs["vision"]
    out_names = [vnames.outputs[k] for k in ("features", "early_scores", "late_scores")]
    features_5 = None
    for crops in (1, 5):
        px = image_like_pixels(crops, vs.image_size, ip.image_mean, ip.image_std, np_dtype)
        got = vision.run(out_names, {vnames.inputs["pixel_values"]: px})
        ref = torch_vision_reference(model, torch.from_numpy(px), vs.feature_layer, (vs.early_layer, vs.late_layer))
        for label, g, r in zip(("features", "early_scores", "late_scores"), got, ref):
            report.checks.append(compare(f"vision {label} ({crops} crop{'s' if crops > 1 else ''})", g, r, tol["vision"]))
        features_5 = got[0]
    del vision

    rng = np.random.default_rng(seed)
    flat = features_5.reshape(-1, features_5.shape[-1])
    kept = np.sort(rng.choice(flat.shape[0], size=min(KEPT_TOKENS, flat.shape[0]), replace=False))
    rows = np.ascontiguousarray(flat[kept])
    projector = ort_session(manifest.path("projector"))
    pspec = manifest.graphs["projector"]
    got = projector.run([pspec.outputs["projected"]], {pspec.inputs["features"]: rows})[0]
    with torch.no_grad():
        ref = model.model.multi_modal_projector(torch.from_numpy(rows)).float().numpy()
    report.checks.append(compare(f"projector ({len(kept)} kept tokens)", got, ref, tol["projector"]))
    del projector

    embed = np.load(manifest.path("embed_tokens"))
    embeds = prompt_embeds(manifest, embed, ref.astype(np_dtype))
    decoder = ort_session(manifest.path("decoder"))
    ort_tokens, ort_logits = ort_greedy(decoder, manifest, embed, embeds, steps)
    torch_tokens, torch_logits = torch_greedy(model, embeds, steps, manifest.tokens.eos)
    report.ort_tokens, report.torch_tokens = ort_tokens, torch_tokens
    same = max(1, min(report.tokens_agree + 1, len(ort_tokens), len(torch_tokens)))  # logits comparable so far
    report.checks.append(
        compare(
            f"decoder logits ({embeds.shape[0]}-token prefill + {same - 1} steps)",
            ort_logits[:same],
            torch_logits[:same],
            tol["logits"],
        )
    )
    for line in report.lines():
        say(f"verify {line}")
    if raise_on_failure and not report.ok:
        raise VerificationError(
            f"bundle {Path(folder)} does not match PyTorch ({dtype}): " + "; ".join(report.failures())
        )
    return report
