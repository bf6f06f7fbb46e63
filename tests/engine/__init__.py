"""Tests of the generation engine (wan_engine/ and headless_wgp) on tiny random-weight models."""
