"""Builds the cold read loop (src/flashtensors/engine/ringread.c) at install time, so that a first load
does not pay its build (0.31 s measured inside a first cold load, H200 machine, 2026-11-28). The library
is optional: without a C compiler the install goes on, and flashtensors builds it on first use or, where
that fails too, reads with its Python loop. Everything else is in pyproject.toml."""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "src/flashtensors/engine/ringread.c"
# The library reports this tag; flashtensors.engine.native loads it only while the source still matches.
TAG = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes())

setup(
    ext_modules=[
        Extension(
            "flashtensors.engine._ringread",
            [SOURCE],
            define_macros=[("FT_SOURCE_TAG", f'"{TAG.hexdigest()[:16]}"')],
            extra_compile_args=["-O2", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
