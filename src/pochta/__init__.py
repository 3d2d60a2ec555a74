"""pochta: a complete mail system in Python (MTA, MSA, mail store and MUA)."""

__version__ = "0.1.0"
