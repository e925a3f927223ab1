"""cartformer: an ARGUS-style transformer over a shopper's history for grocery ranking."""

__version__ = "0.1.0"
