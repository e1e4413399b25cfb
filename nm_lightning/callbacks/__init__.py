"""Lightning callbacks: thin shells that decide *when* the pure cores run."""

from nm_lightning.callbacks.srste import SRSTECallback

__all__ = ["SRSTECallback"]
