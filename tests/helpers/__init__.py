"""Test helpers: a byte-level safetensors builder and comparison utilities (no engine code used here)."""
