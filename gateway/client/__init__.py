"""Client side of x402: build and sign payments for a 402 challenge (the SDK grows here)."""

from .exact import choose_requirement, parse_challenge, sign_exact_payment

__all__ = ["choose_requirement", "parse_challenge", "sign_exact_payment"]
