"""Backends: what turns token ids into logits. One protocol (base.Backend), one module each."""
