"""SD-Zero: self-revision turns binary rewards into dense token-level supervision."""

__version__ = "0.1.0"
