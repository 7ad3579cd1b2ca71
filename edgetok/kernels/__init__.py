"""Numeric inner loops, each with a plain torch reference."""
