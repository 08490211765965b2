"""Shared by the benchmark scripts: print the JSON result (optionally to a file too), parse sampler specs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lefusion_nnunet.diffusion.sampler_config import SAMPLER_NAMES, SamplerConfig


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as indented JSON and write the same text to ``out`` (folders created)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def parse_sampler(text: str) -> SamplerConfig:
    """``NAME[:STEPS][:SPACING][:eta=X]``, e.g. ``dpmpp2m:10:quadratic:eta=1`` -> SamplerConfig (missing parts:
    the sampler's defaults); for the benchmarks' ``--sampler`` / ``--samplers`` options."""
    name, *rest = text.strip().split(":")
    if name not in SAMPLER_NAMES:
        raise argparse.ArgumentTypeError(f"unknown sampler {name!r} (valid: {', '.join(SAMPLER_NAMES)})")
    kwargs: dict = {"name": name}
    for token in rest:
        if token.isdigit():
            kwargs["num_steps"] = int(token)
        elif token.startswith("eta="):
            kwargs["eta"] = float(token[4:])
        else:
            kwargs["timestep_spacing"] = token
    return SamplerConfig(**kwargs)
