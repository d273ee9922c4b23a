"""Inference engines for binary models (see :mod:`bats_cli.engine.bitwise`)."""

from bats_cli.engine.bitwise import (
    ENGINES,
    BitwiseConv2d,
    EngineUnavailable,
    apply_engine,
    binary_conv_names,
    engine_available,
    engine_info,
    simd_path,
    to_bitwise,
)

__all__ = ["BitwiseConv2d", "ENGINES", "EngineUnavailable", "apply_engine", "binary_conv_names",
           "engine_available", "engine_info", "simd_path", "to_bitwise"]
