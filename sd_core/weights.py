"""Loading a state dict into a module built on the meta device, with every key and shape checked."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def load_checked(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], name: str) -> torch.nn.Module:
    """Assign `weights` to `module` (no copy, no random init); raise ValueError naming what does not fit."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    wrong_shape = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (file vs config)", wrong_shape),
        ):
            if items:
                problems.append(
                    f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)} in all)"
                )
        raise ValueError(
            f"{name} weights do not match its config — {'; '.join(problems)}. "
            "Check that the config belongs to these weights (or the model family is right)."
        )
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()
