"""Model-aware memory sizing (kept in ``flashmoe.sizing``, shared with the converter's ``--plan``)."""

from __future__ import annotations

from ..sizing import default_budget, kv_cache_bytes, slots_for_budget

__all__ = ["default_budget", "kv_cache_bytes", "slots_for_budget"]
