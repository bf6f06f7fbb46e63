"""Silence the model libraries' own progress bars: a daemon reports progress in the task row instead."""

from __future__ import annotations

import os


def quiet_progress_bars() -> None:
    """Library progress bars (tqdm) garble a daemon's log; progress goes to the task row instead."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
