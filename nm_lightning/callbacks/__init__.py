"""Lightning callbacks: thin shells that decide *when* the pure cores run."""

from nm_lightning.callbacks.domino import DominoSearchCallback
from nm_lightning.callbacks.last_checkpoint import LastCheckpoint
from nm_lightning.callbacks.scheduler import SparsityScheduler
from nm_lightning.callbacks.srste import SRSTECallback

__all__ = ["DominoSearchCallback", "LastCheckpoint", "SRSTECallback", "SparsityScheduler"]
