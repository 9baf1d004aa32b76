"""A tiny Llama trained on the synthetic long-context tasks (``synthetic_tasks``): the offline
default model. ``tinylm/model`` is the shipped checkpoint; ``tinylm/train.py`` made it."""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
