"""x402 pay-per-request gateway."""
