"""Weight-only quantization as the runtime sees it: the methods a bundle may declare and the onnxruntime they need.

    from runtime.quant import check_onnxruntime
    check_onnxruntime(manifest.quant)     # BundleError naming the minimum onnxruntime, before any session is made

An int4/int8 bundle's decoder runs its linear layers (and lm_head) as onnxruntime's `com.microsoft.MatMulNBits`
contrib op. The CPU kernel for 4-bit weights came with onnxruntime 1.17 (microsoft/onnxruntime#17890 added the
op, 1.17 the first release with it); 8-bit weights got their x86 CPU and CUDA kernels in 1.22
(microsoft/onnxruntime#24491, #24509). Older builds fail at session creation with a message that does not say
what to upgrade, so the runtime checks the version first. A bundle without the manifest key is unquantized.
"""

from __future__ import annotations

import re

from runtime.errors import BundleError

METHODS = ("none", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
MIN_ONNXRUNTIME = {"int4": "1.17", "int8": "1.22"}


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.22.0.dev20250101' -> (1, 22, 0): the leading numeric parts."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def check_method(method: str, block_size: int) -> None:
    """BundleError for a manifest quant entry this runtime does not know."""
    if method not in METHODS:
        raise BundleError(
            f"manifest quant.method is {method!r}; this runtime knows {', '.join(METHODS)}; "
            "re-export the bundle or upgrade hired-edge"
        )
    if method != "none" and (block_size < 16 or block_size & (block_size - 1)):
        raise BundleError(f"manifest quant.block_size must be a power of 2 >= 16, got {block_size}; re-export the bundle")


def check_onnxruntime(method: str, version: str | None = None, *, opset_min: str | None = None) -> None:
    """BundleError if this onnxruntime (or `version`) is older than the first one with `method`'s MatMulNBits.

    `opset_min`: the bundle's own minimum for its opset (manifest export_info.min_onnxruntime); the message names
    the larger of the two."""
    if method not in MIN_ONNXRUNTIME:
        return
    if version is None:
        import onnxruntime

        version = onnxruntime.__version__
    need = MIN_ONNXRUNTIME[method]
    if opset_min and version_tuple(opset_min) > version_tuple(need):
        need = opset_min
    if version_tuple(version) < version_tuple(need):
        raise BundleError(
            f"this bundle's decoder is {method}-quantized (com.microsoft.MatMulNBits, {BITS[method]}-bit weights) "
            f"and needs onnxruntime >= {need}; this is onnxruntime {version}: upgrade onnxruntime, "
            "or re-export without --quant"
        )
