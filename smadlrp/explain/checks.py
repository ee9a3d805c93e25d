"""Which checks a compared method passes, by fixed thresholds, and the same in words (compare-rules' summary).

| check | passes when |
| localisation | mean relevance mass accuracy above the random map's (the masks' area share) |
| abpc | mean ABPC > 0: removing the most relevant patches hurts the score more than removing the least relevant |
| mprt | mean Spearman rank correlation of |map| with the trained model's, fully randomised model, < 0.5 |
| emprt | mean relative rise of the map's histogram entropy under full randomisation > 0 |
| class_sensitivity | mean Spearman correlation between the maps of the two classes' logits < 0.5 |

A check that could not run (no artifact masks, no --sanity, a contrastive target) is None ("not checked").
"""

from __future__ import annotations

from dataclasses import dataclass

MPRT_MAX_SPEARMAN = 0.5
CLASS_MAX_SPEARMAN = 0.5
ABPC_MIN = 0.0
EMPRT_MIN = 0.0
THRESHOLDS: dict[str, float] = {"abpc_above": ABPC_MIN, "mprt_spearman_below": MPRT_MAX_SPEARMAN,
                                "emprt_above": EMPRT_MIN, "class_spearman_below": CLASS_MAX_SPEARMAN}
CHECKS: tuple[str, ...] = ("localisation", "abpc", "mprt", "emprt", "class_sensitivity")


@dataclass(frozen=True)
class CheckValues:
    """What the checks read from one method's results (None: not measured)."""

    mass_accuracy: float | None
    random_mass_accuracy: float | None
    abpc: float | None
    mprt_spearman: float | None  # at the fully randomised model
    emprt: float | None
    class_sensitivity: float | None
    is_random: bool = False  # the random map is the localisation reference, not a candidate


def verdicts(v: CheckValues) -> dict[str, bool | None]:
    """Check name -> passed (True), failed (False) or not checked (None)."""

    def above(value: float | None, limit: float | None) -> bool | None:
        return None if value is None or limit is None else value > limit

    def below(value: float | None, limit: float) -> bool | None:
        return None if value is None else value < limit

    return {"localisation": None if v.is_random else above(v.mass_accuracy, v.random_mass_accuracy),
            "abpc": above(v.abpc, ABPC_MIN), "mprt": below(v.mprt_spearman, MPRT_MAX_SPEARMAN),
            "emprt": above(v.emprt, EMPRT_MIN), "class_sensitivity": below(v.class_sensitivity, CLASS_MAX_SPEARMAN)}


def _phrases(v: CheckValues) -> dict[str, tuple[str, str]]:
    """Check -> (phrase when passed, phrase when failed); only called for checks that ran."""
    mass, rand = v.mass_accuracy or 0.0, v.random_mass_accuracy or 0.0
    abpc, mprt, emprt, cls = v.abpc or 0.0, v.mprt_spearman or 0.0, v.emprt or 0.0, v.class_sensitivity or 0.0
    return {
        "localisation": (f"localisation above random (mass accuracy {mass:.3f} > {rand:.3f})",
                         f"localisation above random (mass accuracy {mass:.3f} <= random {rand:.3f})"),
        "abpc": (f"ABPC > 0 ({abpc:.3g})", f"ABPC > 0 ({abpc:.3g})"),
        "mprt": (f"MPRT (Spearman {mprt:.2f} < {MPRT_MAX_SPEARMAN:g} when fully randomised)",
                 f"MPRT (Spearman {mprt:.2f} >= {MPRT_MAX_SPEARMAN:g} when fully randomised)"),
        "emprt": (f"eMPRT (complexity rise {emprt:+.3f} > 0)", f"eMPRT (complexity rise {emprt:+.3f} <= 0)"),
        "class_sensitivity": (f"class sensitivity (Spearman {cls:.2f} < {CLASS_MAX_SPEARMAN:g} between the "
                              "classes' maps)", f"class sensitivity (Spearman {cls:.2f} >= "
                                                f"{CLASS_MAX_SPEARMAN:g} between the classes' maps)"),
    }


WHY_NOT = {"localisation": "localisation (no artifact masks)", "abpc": "ABPC", "mprt": "MPRT (run with --sanity)",
           "emprt": "eMPRT (run with --sanity)", "class_sensitivity": "class sensitivity (contrastive target)"}


def in_words(v: CheckValues, passed: dict[str, bool | None]) -> str:
    """`passes 3 of 5: ...; fails ...; not checked: ...`, the thresholds and values in brackets."""
    phrases = _phrases(v)
    good = [phrases[c][0] for c in CHECKS if passed[c] is True]
    bad = [phrases[c][1] for c in CHECKS if passed[c] is False]
    skipped = ["localisation (the random map is its reference)" if c == "localisation" and v.is_random
               else WHY_NOT[c] for c in CHECKS if passed[c] is None]
    parts = [f"passes {len(good)} of {len(good) + len(bad)}" + (": " + ", ".join(good) if good else "")]
    if bad:
        parts.append("fails " + ", ".join(bad))
    if skipped:
        parts.append("not checked: " + ", ".join(skipped))
    return "; ".join(parts)
