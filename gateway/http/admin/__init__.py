"""The admin API: the operator's listener (``[admin]``), and the ``x402-gateway admin ...`` commands that call it.

    app.py        the ASGI app: bearer tokens, routes, the audit line of every call
    auth.py       tokens compared in constant time; read and write access
    audit.py      the audit log (JSON Lines, fsynced before the answer leaves)
    calls.py      what a handler is given and gives back; strict readers of its inputs
    queries.py    payments, revenue, exports, pending settlements, jobs, the deny-list, the live config
    actions.py    deny / allow a payer, refunds, reload / price / pause (through a Reloader)
    refunds.py    a refund sent at most once (EIP-3009 nonce per payment, a claim, the ledger)
    masked.py     the live configuration with every secret masked
    stores.py     the stores the admin API opens
    listener.py   ``serve``: the admin listener beside the public one, in one process and event loop
    commands.py   the CLI (talks to the API over HTTP; imports nothing of the server)

This package's ``__init__`` imports nothing, so the CLI commands start without loading the server.
Documentation: docs/operating.md ("Admin API").
"""
