"""Hydra configs of ``nm-train`` (package data; add ``pkg://nm_lightning.conf`` to your Hydra search path)."""
