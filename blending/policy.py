"""The ``auto`` mode: per request, weigh the saving of reuse against its fidelity risk.

Exact reuse (a cached prefix, a prompt that an earlier one extends) never changes the answer and is
always taken. Approximate reuse (chunks blended, anchor-corrected shared messages) is taken only when
  - the prompt is long enough and enough of it is cached for the saving to matter (short prompts and
    prompts with little reusable text run dense: their saving is small and their answers fragile);
  - the model's calibration curve (per recompute budget, the share of prompts whose greedy answer equals
    a dense prefill's token for token, measured by ``kvfuse calibrate`` and persisted under the model
    fingerprint) names a budget that keeps the target share of answers, and that budget still leaves the
    estimated time saving worth having;
  - the online guard (background dense re-runs of a sample) has not seen this tenant's kept answers fall
    below the target; while it has, the budget is raised one calibrated step per shortfall, or dense.
A tenant can also earn a budget from its own traffic: a request that runs exact-only for want of evidence
names ``shadow_ratio``, the guard blends a sample of those at that budget in the background and compares
the answers with the exact ones, and once enough of them were kept (``GuardConfig.min_evidence``) that
tenant's requests blend at it, whatever the model-wide curve says (its workload, not the calibration's,
decides). Otherwise the request runs dense (after any exact prefix) and the decision says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from blending.calibration import Calibration


@dataclass(frozen=True)
class PolicyConfig:
    """``fidelity_target``: the share of answers that must equal dense's (greedy, token for token) at the
    calibrated budget. ``min_prompt_tokens``: shorter prompts run dense. ``min_reuse_tokens`` / ``min_reuse_share``: the
    approximately reusable tokens needed (count and share of the prompt). ``min_saving``: the estimated
    share of prefill work saved below which approximate reuse is not worth its risk. ``max_ratio``: the
    largest recompute budget ``auto`` uses. ``shadow_ratio``: the budget a tenant can earn from its own
    traffic (0: never)."""

    fidelity_target: float = 0.95
    min_prompt_tokens: int = 256
    min_reuse_tokens: int = 128
    min_reuse_share: float = 0.3
    min_saving: float = 0.3
    max_ratio: float = 0.6
    shadow_ratio: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.fidelity_target <= 1.0:
            raise ValueError(TARGET_RANGE)
        if not 0.0 <= self.min_reuse_share <= 1.0 or not 0.0 <= self.min_saving < 1.0:
            raise ValueError("min_reuse_share and min_saving are shares in [0, 1)")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ValueError("max_ratio must be within (0, 1]")
        if not 0.0 <= self.shadow_ratio <= self.max_ratio:
            raise ValueError("shadow_ratio must be within [0, max_ratio]")


TARGET_RANGE = "fidelity_target is the share of answers that must equal dense's, in (0, 1]"


def _best(calibration: Calibration) -> str:
    """`` (0.50 kept 54%)``: the approximate budget that kept the most answers, for a decision's reason."""
    approximate = {r: a for r, a in calibration.curve.items() if r < 1.0}
    if not approximate:
        return ""
    ratio = max(approximate, key=lambda r: (approximate[r], -r))
    return f" ({ratio:.2f} kept {approximate[ratio]:.0%})"


class Features(NamedTuple):
    """What the planner and the lookup found for one request."""

    prompt_tokens: int
    exact_tokens: int  # leading tokens with exact KV (cached prefix, hot prompt)
    cached_tokens: int  # chunk tokens with cached KV (approximate once moved)
    base_tokens: int  # shared-segment tokens with an anchor base (multi-agent), 0 when not looked up
    layers: int
    check_layers: int  # layers that run for every reused token before selection


class Decision(NamedTuple):
    """``mode``: dense | prefix (exact prefix, the rest computed) | blend | hybrid; ``ratio`` for the
    approximate modes; ``reason`` says why in one line (shown in the response)."""

    mode: str
    ratio: float | None
    reason: str
    saving: float  # estimated share of prefill work saved
    shadow: float | None = None  # exact-only for want of evidence: blend this request at it in the background


def estimated_saving(f: Features, approx_tokens: int, ratio: float) -> float:
    """Share of the dense prefill work (after the exact prefix) that approximate reuse skips: reused
    tokens still run ``check_layers + 1`` layers, then ``ratio`` of them the remaining ones."""
    rest = max(1, f.prompt_tokens - f.exact_tokens)
    ran = (f.check_layers + 1) / max(1, f.layers)
    cost = (rest - approx_tokens) + approx_tokens * (ran + ratio * (1.0 - ran))
    return max(0.0, 1.0 - cost / rest)


def decide(
    f: Features, config: PolicyConfig, target: float, calibration: Calibration | None, escalation: int = 0,
    earned: float | None = None,
) -> Decision:
    """The auto mode's choice for one request (pure: no I/O, easy to test). ``earned``: the budget at which
    this tenant's own sampled answers were kept (see the module docstring)."""
    exact = "prefix" if f.exact_tokens > 0 else "dense"
    approx = f.cached_tokens if f.cached_tokens else f.base_tokens
    method = "blend" if f.cached_tokens else "hybrid"

    def safe(why: str) -> Decision:
        return Decision(exact, None, why, f.exact_tokens / max(1, f.prompt_tokens))

    if f.exact_tokens >= f.prompt_tokens - 1:
        return Decision("prefix", None, "the whole prompt is cached exactly", 1.0)
    if f.prompt_tokens < config.min_prompt_tokens:
        return safe(f"short prompt ({f.prompt_tokens} < {config.min_prompt_tokens} tokens): exact only")
    if approx < config.min_reuse_tokens or approx < config.min_reuse_share * f.prompt_tokens:
        return safe(f"little reusable text ({approx} of {f.prompt_tokens} tokens): exact only")
    ladder = calibration.ladder(target) if calibration is not None else []
    unproven = _unproven(calibration, ladder, target, escalation, config)
    if unproven is not None:
        # An earned budget was judged at the service's target: a stricter request target does not use it.
        if earned is not None and target <= config.fidelity_target and method == "blend":
            saving = estimated_saving(f, approx, earned)
            if saving >= config.min_saving:
                return Decision(method, earned, f"{method} {earned:.2f}: this tenant's sampled answers were kept "
                                f"at it ({unproven})", saving)
        shadow = config.shadow_ratio if method == "blend" and config.shadow_ratio > 0.0 else None
        return safe(f"{unproven}: exact only")._replace(shadow=shadow)
    ratio = ladder[escalation]
    saving = estimated_saving(f, approx, ratio)
    if saving < config.min_saving:
        return safe(f"estimated saving {saving:.2f} below {config.min_saving:.2f}: exact only")
    why = f"{method} {ratio:.2f}: calibrated to keep {target:.0%} of answers"
    if escalation:
        why += f" (guard raised the budget {escalation} step{'s' if escalation > 1 else ''})"
    return Decision(method, ratio, why, saving)


def _unproven(calibration: Calibration | None, ladder: list[float], target: float, escalation: int,
              config: PolicyConfig) -> str | None:
    """Why the model-wide curve (its ``ladder`` at ``target``) names no budget for this request (None when
    it does)."""
    if calibration is None:
        return "no calibration for this model yet (run `kvfuse calibrate`)"
    if not ladder or ladder[0] >= 1.0:  # recomputing everything is not reuse
        return f"no calibrated budget keeps {target:.0%} of answers equal to dense's{_best(calibration)}"
    if escalation >= len(ladder):
        return f"guard: answers changed at every budget (target {target:.0%} kept)"
    if ladder[escalation] > config.max_ratio:
        return (f"budget {ladder[escalation]:.2f} keeps {target:.0%} of answers but exceeds {config.max_ratio:.2f}"
                f"{_best(calibration)}")
    return None
