"""Modulators: LFOs, envelopes and audio followers that move live parameters as base + modulation."""
