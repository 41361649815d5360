"""Test and benchmark support: realistic fake host trees (not used by the product at run time)."""
