"""Promotion as the commands meet it: `supsup promote`, `supsup evaluate --promote-if` and a
config's `tracking.promote_if` after `supsup run`. The rule is `pipeline.promotion_rule`'s; the
alias is moved by `pipeline.tracking.promotion`; this module checks the request and says on the
terminal which way it went."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.command_setup import load, resolve_tracking_uri

if TYPE_CHECKING:  # annotations only: each function imports the heavy modules it uses
    from pipeline.jobs.evaluate import EvalReport
    from pipeline.promotion_rule import PromotionRule
    from pipeline.tracking.promotion import Promotion


def check_promote_if(promote_if: str | None, target: str) -> PromotionRule | None:
    """--promote-if's rule (None without one), checked before anything runs: a typo, or a
    target that is not a model version, fails at once."""
    if promote_if is None:
        return None
    from pipeline.promotion_rule import parse_rule

    rule = parse_rule(promote_if)  # a typo fails before anything runs
    if not target.startswith("models:/"):
        raise ValueError(f"--promote-if {promote_if!r} promotes a model version: evaluate "
                         "models:/NAME/VERSION (or models:/NAME@ALIAS) instead of a config")
    return rule


def promote_if_met(rule_text: str, model_uri: str, tracking_uri: str, alias: str,
                   report: EvalReport) -> Promotion | None:
    """Promote `model_uri` to `alias` when the evaluation `report` meets the rule; says on the
    terminal which way it went. Returns the Promotion, or None when the rule is not met."""
    from pipeline.promotion_rule import parse_rule
    from pipeline.tracking.promotion import promote as promote_version

    rule = parse_rule(rule_text)
    value = report.summary.get(rule.metric)
    if not rule.check(report.summary):
        print(f"not promoted: {rule.metric} {value:.4g} does not meet {rule}; @{alias} is "
              "unchanged")
        return None
    done = promote_version(model_uri, tracking_uri, alias, evaluation_run=report.run_id,
                           metrics=report.summary, rule=str(rule))
    print(f"promoted: {rule.metric} {value:.4g} meets {rule}; models:/{done.name}@{alias} -> "
          f"version {done.version} (was {done.previous or 'unset'})")
    return done


def promote(model_uri: str, alias: str | None, tracking_uri: str | None,
            config_path: str | None) -> int:
    """`supsup promote MODEL_URI`: move the promotion alias to the version, named by number."""
    from pipeline.tracking.promotion import promote as promote_version

    alias = alias or (load(config_path).tracking.alias if config_path else "champion")
    done = promote_version(model_uri, resolve_tracking_uri(tracking_uri, config_path), alias)
    evidence = (f"evaluation run {done.evaluation_run}" if done.evaluation_run
                else "no recorded evaluation")
    print(f"models:/{done.name}@{alias} -> version {done.version} (was "
          f"{done.previous or 'unset'}; {evidence})")
    return 0
