"""Errors raised by the generation engine.

The worker classifies failures by type: `InvalidRequestError` and `UnknownModelError` are the
caller's fault (fail at once), `ModelUnavailableError` needs an operator to place weights.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose.

    All of them are permanent for the task that hit them (the worker fails it at once, no retry):
    bad parameters, unknown models and missing weights do not fix themselves.
    """

    permanent = True


class InvalidRequestError(EngineError, ValueError):
    """A generation parameter is wrong; the message names it, its value and what is allowed."""


class UnknownModelError(EngineError, ValueError):
    """A model key names no preset; the message lists the known keys."""


class PresetError(EngineError, ValueError):
    """A preset file is malformed; the message names the file and the field."""


class ModelUnavailableError(EngineError):
    """A preset's weights are not on this machine; the message says where we looked and how to fix it."""
