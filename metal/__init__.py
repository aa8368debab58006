"""Device memory: the expert slot bank and memory limits."""

from .bank import BankFullError, ExpertBank, LRUPolicy

__all__ = ["BankFullError", "ExpertBank", "LRUPolicy"]
