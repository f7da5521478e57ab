"""``batch-settlement``: payment channels (sessions) with cumulative vouchers and metered prices (docs/sessions.md).

check.py     the offer's terms and every check of a session payment that needs no I/O
meter.py     a metered charge read from the upstream's answer
onchain.py   the settlement contract: channel reads, deposits, claims, sweeps, refunds
scheme.py    the scheme's offer and its claim on a presented header
"""
