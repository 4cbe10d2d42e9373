"""eaglepipe: reproducible training and evaluation of EAGLE speculative-decoding drafters."""

__version__ = "0.1.0"
