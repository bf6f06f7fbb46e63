"""Wan generation engine: presets, model sources, tiny test models and video I/O.

`headless_wgp.WanOrchestrator` builds on these modules; nothing here touches a database.
"""

from __future__ import annotations
