"""Benchmarks of the gateway against the upstream alone and the official x402 stack, and its performance targets.

Run ``python -m bench`` (or ``make bench``); ``python -m bench --quick`` for a one-minute pass.
"""
