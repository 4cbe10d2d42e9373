"""Per-generation records and the per-point metrics computed from them (τ, acceptance, tok/s, speedup, match)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from ..config import SweepPoint


@dataclass
class Sample:
    """One measured generation (one turn of one prompt).

    `verify_rounds` is the number of target verification forwards (SGLang's `spec_verify_ct`; 0 without
    speculation). `accept_hist[a]` counts the rounds that accepted `a` draft tokens (None when the backend
    does not report it). `decode_s` is the time from the first to the last generated token.
    """

    prompt_index: int
    turn: int
    text: str
    completion_tokens: int
    verify_rounds: int
    decode_s: float
    token_ids: list[int] | None = None
    accept_hist: list[int] | None = None


@dataclass
class PointResult:
    """What one sweep point (or the baseline) measured at one temperature."""

    point: SweepPoint | None  # None = the non-speculative baseline
    temperature: float
    samples: list[Sample]
    wall_s: float

    @property
    def name(self) -> str:
        """`baseline_t0.0`, `s3_k1_n4_t0.0`, ..."""
        return f"{'baseline' if self.point is None else self.point.name}_t{self.temperature:.1f}"


@dataclass
class PointSummary:
    """The metrics of one point; the row of sweep.csv and the body of points/<name>.json."""

    name: str
    config: str
    temperature: float
    num_steps: int | None
    topk: int | None
    num_draft_tokens: int | None
    num_samples: int
    completion_tokens: int
    verify_rounds: int
    tau: float | None
    accept_rate: list[float] | None
    accept_reach: list[float] | None
    decode_tok_s: float | None
    throughput_tok_s: float | None
    speedup: float | None
    outputs_match: bool | None
    match_fraction: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    tau_by_turn: list[float | None] | None = None  # τ of turn 1, 2, ... (later turns build on earlier answers)

    def to_json(self) -> dict[str, Any]:
        """A plain dict (JSON-ready)."""
        return asdict(self)


def tau(samples: Sequence[Sample]) -> float | None:
    """Acceptance length: generated tokens ÷ verification rounds (the bonus token counts); None without rounds."""
    rounds = sum(s.verify_rounds for s in samples)
    return sum(s.completion_tokens for s in samples) / rounds if rounds else None


def tau_by_turn(samples: Sequence[Sample]) -> list[float | None]:
    """τ of each turn (the first, the second, ...) over the prompts that have it."""
    last = max((s.turn for s in samples), default=-1)
    return [tau([s for s in samples if s.turn == t]) for t in range(last + 1)]


def merged_histogram(samples: Sequence[Sample]) -> list[int] | None:
    """The summed accepted-drafts histogram of all samples; None if any sample lacks one."""
    if not samples or any(s.accept_hist is None for s in samples):
        return None
    total = [0] * max(len(s.accept_hist) for s in samples)  # type: ignore[arg-type]
    for s in samples:
        for a, n in enumerate(s.accept_hist):  # type: ignore[arg-type]
            total[a] += n
    return total


def position_acceptance(hist: Sequence[int], depth: int) -> tuple[list[float], list[float]]:
    """Per draft position i = 1..depth: (conditional rate, reach rate).

    reach[i] = fraction of rounds that accepted at least i drafts; rate[i] = reach[i] / reach[i-1], the
    chance that draft i is accepted given that drafts 1..i-1 were (0 when no round got that far).
    """
    rounds = sum(hist)
    at_least = [sum(hist[i:]) for i in range(depth + 1)]
    reach = [at_least[i] / rounds if rounds else 0.0 for i in range(1, depth + 1)]
    rate = [at_least[i] / at_least[i - 1] if at_least[i - 1] else 0.0 for i in range(1, depth + 1)]
    return rate, reach


def decode_tok_s(samples: Sequence[Sample]) -> float | None:
    """Decode speed: tokens after the first ÷ time from first to last token, summed over samples."""
    timed = [s for s in samples if s.completion_tokens >= 2 and s.decode_s > 0]
    seconds = sum(s.decode_s for s in timed)
    return sum(s.completion_tokens - 1 for s in timed) / seconds if seconds else None


def match_fraction(samples: Sequence[Sample], baseline: Sequence[Sample]) -> float:
    """Fraction of generations identical to the baseline's for the same prompt and turn.

    Token ids are compared when both sides have them, else the text.
    """
    ref = {(s.prompt_index, s.turn): s for s in baseline}
    same = 0
    for s in samples:
        b = ref.get((s.prompt_index, s.turn))
        if b is None:
            continue
        same += (s.token_ids == b.token_ids) if s.token_ids is not None and b.token_ids is not None \
            else (s.text == b.text)
    return same / len(samples) if samples else 0.0


def summarize(result: PointResult, baseline: PointResult | None) -> PointSummary:
    """Metrics of one point against the baseline at the same temperature (speedup/match None without one)."""
    p, samples = result.point, result.samples
    tok_s = decode_tok_s(samples)
    base_tok_s = decode_tok_s(baseline.samples) if baseline is not None else None
    hist = merged_histogram(samples) if p is not None else None
    rate, reach = position_acceptance(hist, p.num_steps) if hist is not None and p is not None else (None, None)
    frac = match_fraction(samples, baseline.samples) if baseline is not None and p is not None else None
    completion = sum(s.completion_tokens for s in samples)
    return PointSummary(
        name=result.name,
        config="baseline" if p is None else p.name,
        temperature=result.temperature,
        num_steps=None if p is None else p.num_steps,
        topk=None if p is None else p.topk,
        num_draft_tokens=None if p is None else p.num_draft_tokens,
        num_samples=len(samples),
        completion_tokens=completion,
        verify_rounds=sum(s.verify_rounds for s in samples),
        tau=tau(samples) if p is not None else None,
        accept_rate=rate,
        accept_reach=reach,
        decode_tok_s=tok_s,
        throughput_tok_s=completion / result.wall_s if result.wall_s > 0 else None,
        speedup=tok_s / base_tok_s if p is not None and tok_s and base_tok_s else None,
        outputs_match=(frac == 1.0) if frac is not None and result.temperature == 0 else None,
        match_fraction=frac,
        extra={"accept_hist": hist} if hist is not None else {},
        tau_by_turn=tau_by_turn(samples) if p is not None else None,
    )


def _best(rows: Sequence[PointSummary], key: str) -> PointSummary | None:
    scored = [r for r in rows if getattr(r, key) is not None]
    return max(scored, key=lambda r: getattr(r, key)) if scored else None


def overall_metrics(rows: Sequence[PointSummary]) -> dict[str, Any]:
    """metrics.json: the best τ and speedup (at the lowest temperature measured) and per-temperature detail."""
    temps = sorted({r.temperature for r in rows})
    by_temp: dict[str, Any] = {}
    for t in temps:
        at_t = [r for r in rows if r.temperature == t]
        base = next((r for r in at_t if r.config == "baseline"), None)
        best_tau, best_speed = _best(at_t, "tau"), _best(at_t, "speedup")
        by_temp[f"{t:.1f}"] = {
            "baseline_tok_s": base.decode_tok_s if base else None,
            "baseline_runs": base.extra.get("baseline_runs") if base else None,
            "best_tau": best_tau.tau if best_tau else None,
            "best_tau_config": best_tau.config if best_tau else None,
            "best_speedup": best_speed.speedup if best_speed else None,
            "best_speedup_config": best_speed.config if best_speed else None,
        }
    greedy = [r for r in rows if r.temperature == 0 and r.config != "baseline" and r.outputs_match is not None]
    first = by_temp[f"{temps[0]:.1f}"] if temps else {}
    return {
        "temperature": temps[0] if temps else None,
        "best_tau": first.get("best_tau"),
        "best_tau_config": first.get("best_tau_config"),
        "best_speedup": first.get("best_speedup"),
        "best_speedup_config": first.get("best_speedup_config"),
        "baseline_tok_s": first.get("baseline_tok_s"),
        "baseline_runs": first.get("baseline_runs"),
        "all_outputs_match": all(r.outputs_match for r in greedy) if greedy else None,
        "num_points": len([r for r in rows if r.config != "baseline"]),
        "by_temperature": by_temp,
    }
