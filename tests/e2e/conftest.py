"""End-to-end fixtures: ``store_url`` runs a test once per receipt-store backend (SQLite file, real Redis)."""

from __future__ import annotations
