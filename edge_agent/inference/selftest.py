"""Manifest self-tests: a deterministic input recipe and the expected output statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import UntrustedError
from hub_protocol.manifest import Manifest


class SelfTestFailed(UntrustedError):
    """The model did not reproduce its manifest's expected output: do not activate it."""


class Session(Protocol):
    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, Any]) -> Sequence[Any]: ...


def make_input(recipe: Mapping[str, Any], shape: Sequence[int]) -> np.ndarray:
    """The self-test input: ``ramp`` (low..high over all elements), ``constant`` (value) or
    ``normal`` (standard normal, seeded). Dynamic (-1) dimensions become 1 for N and 32 else."""
    dims = [int(d) for d in shape]
    if dims and dims[0] < 0:
        dims[0] = int(recipe.get("batch", 1))
    dims = [d if d > 0 else 32 for d in dims]
    n = int(np.prod(dims))
    gen = recipe["generator"]
    if gen == "ramp":
        flat = np.linspace(float(recipe.get("low", 0.0)), float(recipe.get("high", 1.0)), n)
    elif gen == "constant":
        flat = np.full(n, float(recipe.get("value", 0.0)))
    elif gen == "normal":
        flat = np.random.default_rng(int(recipe.get("seed", 0))).standard_normal(n)
    else:
        raise ValueError(f"unknown self-test generator {gen!r}")
    return flat.reshape(dims).astype(np.float32)


def run_self_test(
    session: Session, manifest: Manifest, *, shape: Sequence[int] | None = None
) -> tuple[float, float]:
    """Run the manifest's self-test on ``session``; return (mean, std) of the output.

    Raises :class:`SelfTestFailed` when either differs from the manifest by more than atol.
    """
    st = manifest.self_test
    recipe = {
        "generator": st.generator,
        "low": st.low,
        "high": st.high,
        "value": st.value,
        "seed": st.seed,
        "batch": st.batch,
    }
    x = make_input(recipe, shape or manifest.input.shape)
    out = np.asarray(session.run([manifest.output.name], {manifest.input.name: x})[0])
    mean, std = float(np.mean(out)), float(np.std(out))
    if not (abs(mean - st.mean) <= st.atol and abs(std - st.std) <= st.atol):
        raise SelfTestFailed(
            f"{manifest.name} {manifest.version}: self-test output mean/std {mean:.6g}/{std:.6g}"
            f" differ from the expected {st.mean:.6g}/{st.std:.6g} (atol {st.atol:g})"
        )
    return mean, std
