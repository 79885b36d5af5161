"""HiRED visual-token dropping for LLaVA-NeXT, in numpy: layout geometry, budget plan, top-k, packing."""

from hired.layout import AnyresLayout

__all__ = ["AnyresLayout"]
